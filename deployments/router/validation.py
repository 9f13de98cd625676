"""Checks vLLM's protocol models leave to the engine, done up front.

Pure functions of the parsed request: each returns the first problem as a
``RequestProblem`` (an OpenAI 400 with the offending ``param``), or None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

# Roles whose message carries the conversation text and so must have content.
CONTENT_REQUIRED_ROLES = frozenset({"system", "developer", "user"})


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
        role = message.get("role")
        content = message.get("content")
        if role in CONTENT_REQUIRED_ROLES and (content is None or content == []):
            return RequestProblem(
                f"messages[{index}] has role {role!r} but no 'content'", f"messages[{index}].content"
            )
    return None
