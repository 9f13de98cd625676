"""Request models where vLLM's differ from OpenAI's documented API or fail on what a client may send.

- vLLM declares the completion request's ``n`` as a plain int, so ``"n": null``
  (which OpenAI documents as allowed, meaning the default 1, and which chat
  already accepts) fails validation with a 400. Here null means 1.
- vLLM's "before" model validators read the raw body and assume the types they
  expect: ``"structured_outputs": "x"``, ``"messages": null`` or a tool without
  ``function`` raise TypeError, AttributeError or KeyError there, which pydantic
  does not turn into a validation error, so the client got a 500. Here such a
  failure becomes a 400 naming the first field whose value does not fit its
  declared type.
- Values vLLM accepts and then fails on inside the engine, refused up front
  with a 400 naming the field: an integer beyond 64 bits anywhere (``top_k``,
  ``stream_interval``, ``routed_experts_prompt_start`` of 10**40 could not be
  serialised to the engine core: a 500, counted as a replica fault);
  ``allowed_token_ids`` with a structured output (the grammar and the allowed
  set can exclude every token: the engine terminates the request with an
  internal error); ``truncate_prompt_tokens: 0`` (an empty prompt).
- Booleans, numbers and strings taken for each other: pydantic's lax mode reads ``"max_tokens": true``
  as 1, ``"stream": "yes"`` as true and ``"temperature": "0.5"`` as 0.5, where OpenAI's API refuses
  them. For every field declared as booleans and/or numbers, another JSON type is a 400 naming it.
- vLLM's own checks across fields raise its ``VLLMClientError`` (``VLLMValidationError``: an empty
  ``prompt``, ``response_format`` json_schema without a schema), which is not a ValueError: pydantic let
  it through, Ray's middleware logged a 60-line traceback and answered type ``VLLMValidationError`` with
  the message three times. Here it is a ``FieldError``: a 400 ``invalid_request_error`` naming the field
  (errors.py), no traceback.
"""

from __future__ import annotations

import functools
import json
import types
import typing
from typing import Any

from pydantic import TypeAdapter, ValidationError, field_validator, model_validator
from ray.serve.llm.openai_api_models import ChatCompletionRequest as _ChatCompletionRequest
from ray.serve.llm.openai_api_models import CompletionRequest as _CompletionRequest

# What vLLM's raw-body validators raise on a value of an unexpected type.
RAW_VALIDATOR_FAILURES = (TypeError, AttributeError, KeyError, IndexError)
try:  # vLLM's request errors (vllm.exceptions; the GPU stack's older vLLM may lack the module)
    from vllm.exceptions import VLLMClientError as _VLLMClientError

    CLIENT_ERRORS: tuple[type[BaseException], ...] = (_VLLMClientError,)
except ImportError:
    CLIENT_ERRORS = ()


class FieldError(ValueError):
    """A request field's value refused by a check across fields; ``param`` names the field (or None).
    pydantic turns it into a validation error that keeps this exception, so errors.py can name the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(f"'{param}': {message}" if param else message)  # pydantic's text names the field
        self.message, self.param = message, param


def first_bad_field(model: type, data: Any) -> FieldError:
    """The error naming the first field of ``data`` whose value does not fit ``model``'s declared type."""
    if isinstance(data, dict):
        for name, value in data.items():
            field = model.model_fields.get(name)
            if field is None:
                continue
            try:
                TypeAdapter(field.annotation).validate_python(value)
            except ValidationError as invalid:
                return FieldError(invalid.errors()[0]["msg"], name)
    return FieldError("the request body does not match the request schema")


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _holds_huge_int(value: Any) -> bool:
    if isinstance(value, int):
        return not INT64_MIN <= value <= INT64_MAX
    if isinstance(value, dict):
        return any(_holds_huge_int(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_huge_int(v) for v in value)
    return False


def check_raw_fields(data: Any) -> None:
    """Refuse (FieldError: a 400 naming the field) what the engine cannot carry: integers beyond 64 bits."""
    if isinstance(data, dict):
        for name, value in data.items():
            if _holds_huge_int(value):
                raise FieldError("holds an integer outside the 64-bit range", name)


@functools.cache
def request_field_names() -> frozenset[str]:
    """Every field of the chat and completion request models (vLLM's, as Ray Serve LLM exports them)."""
    return frozenset(_ChatCompletionRequest.model_fields) | frozenset(_CompletionRequest.model_fields)


_SCALARS = (bool, int, float)


def _scalar_members(annotation: Any) -> set[type] | None:
    """The types of a field declared as booleans and/or numbers (optionally nullable); None for any other."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _scalar_members(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
    else:
        members = [annotation]
    return set(members) if members and all(m in _SCALARS for m in members) else None


@functools.cache
def _scalar_kinds(model: type, name: str) -> frozenset[type] | None:
    """``_scalar_members`` of ``model``'s field ``name``, worked out once per declared field."""
    kinds = _scalar_members(model.model_fields[name].annotation)
    return frozenset(kinds) if kinds is not None else None


def check_scalar_types(model: type, data: Any) -> None:
    """Refuse (FieldError: a 400 naming the field) a boolean, number or string where OpenAI's API takes
    another of them: pydantic's lax mode would read ``"max_tokens": true`` as 1, ``"stream": "yes"`` as
    true and ``"temperature": "0.5"`` as 0.5, answering a request OpenAI refuses."""
    if not isinstance(data, dict):
        return
    for name, value in data.items():
        if name not in model.model_fields:  # unknown keys are vLLM's to ignore, and never cached here
            continue
        kinds = _scalar_kinds(model, name)
        if kinds is None or value is None:
            continue
        if isinstance(value, bool):
            fits = bool in kinds
        elif isinstance(value, (int, float)):
            fits = bool(kinds & {int, float}) and (isinstance(value, int) or float in kinds or value.is_integer())
        else:
            fits = False
        if not fits:
            wanted = " or ".join(sorted({"a boolean" if k is bool else "a number" if float in kinds else "an integer"
                                         for k in kinds}))
            raise FieldError(f"expected {wanted}, got {json.dumps(value)[:40]}", name)


def check_parsed(request) -> None:
    """Refuse combinations vLLM accepts but fails on inside the engine."""
    if request.truncate_prompt_tokens == 0:
        raise ValueError("'truncate_prompt_tokens' 0 would leave an empty prompt; use null or -1 for none")
    format_type = getattr(request.response_format, "type", None)
    structured = request.structured_outputs is not None or format_type not in (None, "text")
    if request.allowed_token_ids and structured:
        raise ValueError("'allowed_token_ids' cannot be combined with a structured output (response_format or "
                         "structured_outputs): together they can leave no token to generate")


def validate_naming_the_field(model: type, data: Any, handler) -> Any:
    check_raw_fields(data)
    check_scalar_types(model, data)
    try:
        request = handler(data)
    except RAW_VALIDATOR_FAILURES:
        # pydantic turns a ValueError into a validation error: a 400 in OpenAI's format.
        raise first_bad_field(model, data) from None
    except CLIENT_ERRORS as refused:
        parameter = getattr(refused, "parameter", None)
        message = refused.args[0] if refused.args else str(refused)
        raise FieldError(str(message), parameter if isinstance(parameter, str) else None) from None
    check_parsed(request)
    return request


class ChatCompletionRequest(_ChatCompletionRequest):
    @model_validator(mode="wrap")
    @classmethod
    def _raw_failures_name_the_field(cls, data: Any, handler) -> Any:
        return validate_naming_the_field(cls, data, handler)


class CompletionRequest(_CompletionRequest):
    n: int | None = 1

    @field_validator("n")
    @classmethod
    def _null_means_one(cls, n: int | None) -> int:
        return 1 if n is None else n

    @model_validator(mode="wrap")
    @classmethod
    def _raw_failures_name_the_field(cls, data: Any, handler) -> Any:
        return validate_naming_the_field(cls, data, handler)
