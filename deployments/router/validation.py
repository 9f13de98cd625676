"""Checks vLLM's protocol models leave to the engine, done up front.

Pure functions of the parsed request: each returns the first problem as a
``RequestProblem`` (an OpenAI 400 with the offending ``param``), or None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

# Roles whose message carries the conversation text and so must have content.
CONTENT_REQUIRED_ROLES = frozenset({"system", "developer", "user"})
# What OpenAI takes (vLLM takes any role and part type): each role's content part types.
PART_TYPES = {"system": ("text",), "developer": ("text",), "user": ("text", "image_url", "input_audio", "file"),
              "assistant": ("text", "refusal"), "tool": ("text",), "function": ("text",)}


@dataclass(frozen=True)
class RequestProblem:
    message: str
    param: str
    status: int = 400


def check_chat_messages(messages: Iterable[Mapping[str, Any]]) -> RequestProblem | None:
    messages = list(messages)
    if not messages:
        return RequestProblem("'messages' must contain at least one message", "messages")
    for index, message in enumerate(messages):
        problem = _materialise_content(index, message)
        if problem is not None:
            return problem
        problem = check_role_and_parts(index, message)
        if problem is not None:
            return problem
        role = message.get("role")
        content = message.get("content")
        if role in CONTENT_REQUIRED_ROLES and (content is None or content == []):
            return RequestProblem(
                f"messages[{index}] has role {role!r} but no 'content'", f"messages[{index}].content"
            )
    return None


def _materialise_content(index: int, message) -> RequestProblem | None:
    """Turn a content given as parts into a list, in place.

    vLLM's message types declare parts as an ``Iterable``, which pydantic keeps as a one-shot lazy
    iterator: ``content == []`` is never true of it and checking its parts would consume them. A list
    can be checked here and still reaches the engine whole.
    """
    content = message.get("content") if isinstance(message, dict) else None
    if content is None or isinstance(content, (str, list)):
        return None
    try:
        message["content"] = list(content)
    except Exception as exc:  # a part pydantic refuses while iterating
        return RequestProblem(f"Invalid value for 'messages[{index}].content': {str(exc)[:300]}",
                              f"messages[{index}].content")
    return None


# Request fields that name token ids (besides a completion's token-id prompt).
TOKEN_ID_FIELDS = ("allowed_token_ids", "stop_token_ids", "logprob_token_ids")


def _out_of_vocabulary(ids: Iterable[Any], vocab_size: int) -> Any:
    return next((t for t in ids if isinstance(t, int) and not 0 <= t < vocab_size), None)


def check_token_ids(fields: Mapping[str, Any], vocab_size: int) -> RequestProblem | None:
    """Every token id a request names must index the model's vocabulary.

    vLLM 0.29 checks a prompt's ids against ``max(tokenizer.max_token_id,
    vocab - 1)``, where its tokenizer's max_token_id can be the vocabulary
    *size*: a prompt holding that one id passed and the embedding lookup
    aborted the whole engine process. The other id fields are refused the same
    way, as OpenAI refuses a logit_bias key that is not a token.
    """
    prompt = fields.get("prompt")
    if isinstance(prompt, list):
        rows = [prompt] if all(isinstance(t, int) for t in prompt) else [p for p in prompt if isinstance(p, list)]
        for row in rows:
            if (bad := _out_of_vocabulary(row, vocab_size)) is not None:
                return RequestProblem(f"'prompt' holds token id {bad}, outside this model's vocabulary "
                                      f"(0 to {vocab_size - 1})", "prompt")
    for name in TOKEN_ID_FIELDS:
        if (bad := _out_of_vocabulary(fields.get(name) or (), vocab_size)) is not None:
            return RequestProblem(f"'{name}' holds token id {bad}, outside this model's vocabulary "
                                  f"(0 to {vocab_size - 1})", name)
    for key in fields.get("logit_bias") or {}:
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab_size:
            return RequestProblem(f"'logit_bias' key {key!r} is not a token id of this model's vocabulary "
                                  f"(0 to {vocab_size - 1})", "logit_bias")
    return None


# Names vLLM passes to the chat template itself: set again in chat_template_kwargs
# they fail inside the template call ("got multiple values for keyword argument").
TEMPLATE_RESERVED = frozenset({"messages", "conversation", "tools", "documents", "chat_template"})


def check_chat_template_kwargs(kwargs: Mapping[str, Any] | None) -> RequestProblem | None:
    clashes = sorted(TEMPLATE_RESERVED & set(kwargs or {}))
    if clashes:
        return RequestProblem(f"'chat_template_kwargs' may not set {', '.join(clashes)}: the request "
                              f"supplies them", "chat_template_kwargs")
    return None


def check_role_and_parts(index: int, message: Mapping[str, Any]) -> RequestProblem | None:
    """OpenAI's checks of a message: a known role, part types that role takes, a tool turn's call id."""
    if not isinstance(message, Mapping):
        # vLLM parses a role-less object as its harmony `Message` (no .get): a 500 before this check.
        return RequestProblem(f"messages[{index}] has no 'role'", f"messages[{index}].role")
    role = message.get("role")
    if role not in PART_TYPES:
        return RequestProblem(f"Invalid value for 'messages[{index}].role': {repr(role)[:80]}; supported values are "
                              f"{', '.join(map(repr, PART_TYPES))}", f"messages[{index}].role")
    content = message.get("content")
    for part_index, part in enumerate(content if isinstance(content, list) else ()):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind not in PART_TYPES[role]:
            return RequestProblem(f"Invalid value for 'messages[{index}].content[{part_index}].type': {kind!r}; "
                                  f"a {role} message takes {', '.join(map(repr, PART_TYPES[role]))}",
                                  f"messages[{index}].content[{part_index}].type")
    required = {"tool": "tool_call_id", "function": "name"}.get(role)
    if required and not message.get(required):
        return RequestProblem(f"messages[{index}] has role {role!r} but no {required!r}",
                              f"messages[{index}].{required}")
    return None
