"""Unit tests of the router's up-front request checks."""

from deployments.router.validation import check_chat_messages


def test_empty_messages():
    problem = check_chat_messages([])
    assert problem.status == 400 and problem.param == "messages"


def test_user_message_without_content():
    problem = check_chat_messages([{"role": "system", "content": "be brief"}, {"role": "user"}])
    assert problem.param == "messages[1].content"
    assert "'user'" in problem.message


def test_empty_content_parts():
    assert check_chat_messages([{"role": "user", "content": []}]).param == "messages[0].content"


def test_assistant_tool_call_without_content_is_fine():
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]},
    ]
    assert check_chat_messages(messages) is None


def test_empty_string_content_is_allowed():
    # OpenAI accepts "" (it is content, just short); only absence is refused.
    assert check_chat_messages([{"role": "user", "content": ""}]) is None


# --- token ids and chat_template_kwargs (issue 11) --------------------------------

from deployments.router.validation import check_chat_template_kwargs, check_token_ids  # noqa: E402


def test_token_id_equal_to_the_vocabulary_size_is_refused():
    # vLLM 0.29 let this one id through to the embedding lookup, which aborted the engine.
    assert check_token_ids({"prompt": [1, 100]}, 100).param == "prompt"
    assert check_token_ids({"prompt": [[1], [2, -1]]}, 100).param == "prompt"
    assert check_token_ids({"prompt": [[1], [99]]}, 100) is None
    assert check_token_ids({"prompt": "text"}, 100) is None


def test_token_id_fields_are_bounded():
    for name in ("allowed_token_ids", "stop_token_ids", "logprob_token_ids"):
        assert check_token_ids({name: [0, 100]}, 100).param == name
        assert check_token_ids({name: [0, 99]}, 100) is None
    assert check_token_ids({"logit_bias": {"100": 1.0}}, 100).param == "logit_bias"
    assert check_token_ids({"logit_bias": {"abc": 1.0}}, 100).param == "logit_bias"
    assert check_token_ids({"logit_bias": {"5": -100}}, 100) is None


def test_chat_template_kwargs_may_not_reset_the_template_arguments():
    assert check_chat_template_kwargs({"messages": []}).param == "chat_template_kwargs"
    assert check_chat_template_kwargs({"enable_thinking": True}) is None
    assert check_chat_template_kwargs(None) is None


def test_empty_parts_as_parsed_by_the_request_model_are_refused_and_parts_survive_the_check():
    # vLLM's message types keep parts as a one-shot iterator; `content: []` used to pass as 200.
    from deployments.router.request_models import ChatCompletionRequest

    empty = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": []}]})
    problem = check_chat_messages(empty.messages)
    assert problem is not None and problem.param == "messages[0].content"
    parts = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": " of France?"}]
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": parts}]})
    assert check_chat_messages(body.messages) is None
    assert body.model_dump()["messages"][0]["content"] == parts  # checked, and still whole for the engine
