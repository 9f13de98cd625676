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
