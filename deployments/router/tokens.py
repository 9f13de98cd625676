"""Count a prompt's tokens the way the engine will: served tokenizer, after the chat template.

The class a request gets hangs on this count, so it follows vLLM's own chat
rendering (``vllm.entrypoints.chat_utils._parse_chat_message_content``) for
text content, not an approximation of it:

- the chat template's *content format* decides what a message's content is:
  "string" templates get text (a list of text parts joined with newlines, as
  vLLM joins them), "openai" templates get the list of ``{"type": "text"}``
  parts; vLLM's own detector decides which, where it is importable; in the
  "string" format empty texts are dropped before the join, as vLLM drops them;
- text parts are ``text``, ``input_text``, ``output_text``, ``refusal`` and
  ``thinking``; a part whose text is null is skipped;
- a tool message's text parts are joined into a string in either format;
- ``add_generation_prompt`` / ``continue_final_message`` come from the request;
- the rendered prompt is tokenised without adding special tokens (vLLM's
  default for chat).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

# vLLM's text-like content part types and the key that holds their text.
TEXT_PART_KEYS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal",
                  "thinking": "thinking"}


@dataclass(frozen=True)
class PromptTokens:
    """A request's prompt in tokens. ``longest``: its longest prompt, which classifies it and must fit each
    sequence's context; ``total``: what the engine prefills and reports as ``usage.prompt_tokens`` (a
    completions batch sums its prompts); ``prompts``: how many prompts (a completions batch has several,
    each run as its own sequences)."""

    longest: int
    total: int
    prompts: int = 1
    # False: a text too large to fit any pool's context was not tokenised; the counts are a lower bound
    # from its size (PromptTokenCounter's context_limit).
    exact: bool = True

    @classmethod
    def one(cls, tokens: int) -> "PromptTokens":
        return cls(tokens, tokens, 1)


class _BeyondContext(Exception):
    """A text whose size alone puts it beyond the context limit: ``at_least`` tokens, in a request of
    ``prompts`` prompts."""

    def __init__(self, at_least: int, prompts: int = 1):
        super().__init__(at_least)
        self.at_least, self.prompts = at_least, prompts

    def counted(self) -> PromptTokens:
        return PromptTokens(self.at_least, self.at_least, self.prompts, exact=False)


def detect_content_format(chat_template: str | None) -> str:
    """"string" or "openai", decided by vLLM's detector (0.29: renderers.hf; older: entrypoints.chat_utils)."""
    if not chat_template:
        return "string"
    try:
        from vllm.renderers.hf import _detect_content_format
    except ImportError:
        try:
            from vllm.entrypoints.chat_utils import _detect_content_format
        except ImportError:
            return "string"  # vLLM's default when it cannot tell
    return _detect_content_format(chat_template, default="string")


def text_parts(content: Any) -> list[str]:
    """The texts of a message's content: one for a string, one per text part of a list."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, Mapping) and part.get("type") in TEXT_PART_KEYS:
            text = part.get(TEXT_PART_KEYS[part["type"]])
            if text is not None:
                texts.append(text)
    return texts


def render_message(message: Mapping[str, Any], content_format: str) -> dict[str, Any]:
    """One message as vLLM hands it to the chat template (text content only)."""
    role = message.get("role", "user")
    texts = text_parts(message.get("content"))
    if content_format == "openai":
        # Parts stay parts (empty ones too); a tool's are joined into a string.
        content: Any = "\n".join(texts) if role == "tool" else [{"type": "text", "text": t} for t in texts]
    else:
        content = "\n".join(t for t in texts if t)  # vLLM drops empty texts before joining
    rendered = {"role": role, "content": content}
    for key in ("name", "tool_call_id"):
        if isinstance(message.get(key), str):
            rendered[key] = message[key]
    return rendered


def model_vocab_size(tokenizer, source: str) -> int:
    """How many token ids a request may name: those the tokenizer has and the model's embedding too."""
    size = len(tokenizer)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source)
        size = min(size, getattr(config.get_text_config(), "vocab_size", None) or size)
    except Exception:  # no readable config: the tokenizer's own size still bounds what it can decode
        pass
    return size


def max_token_bytes(tokenizer) -> int:
    """The most UTF-8 bytes of any token's text in ``tokenizer``'s vocabulary (added tokens included): no
    token covers more of a text, so a text of B bytes has at least B / this many tokens."""
    return max((len(token.encode("utf-8", "surrogatepass")) for token in tokenizer.get_vocab()), default=1) or 1


class PromptTokenCounter:
    """``context_limit``: the largest context any pool takes (tokens). A text whose size alone puts it
    beyond that is not tokenised (a 4 MB prompt took the router 6.8 s of CPU to refuse): its counts are
    then a lower bound, ``PromptTokens.exact`` False."""

    def __init__(self, tokenizer_source: str, context_limit: int | None = None):
        from transformers import AutoTokenizer  # heavy; only in the router replica

        self._tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        self.vocab_size = model_vocab_size(self._tokenizer, tokenizer_source)
        self._content_format = detect_content_format(getattr(self._tokenizer, "chat_template", None))
        self.context_limit = context_limit
        self._max_token_bytes = max_token_bytes(self._tokenizer) if context_limit else 1

    def _count(self, text: str) -> int:
        if self.context_limit and len(text) > self.context_limit:  # only then is the size worth a look
            # Halved: a tokenizer's normaliser may shorten a text a little before it is split.
            at_least = len(text.encode("utf-8", "surrogatepass")) // (2 * self._max_token_bytes)
            if at_least > self.context_limit:
                raise _BeyondContext(at_least)
        return len(self._tokenizer.encode(text, add_special_tokens=False))

    def chat(self, messages: Iterable[Mapping[str, Any]], *, add_generation_prompt: bool = True,
             continue_final_message: bool = False) -> PromptTokens:
        conversation = [render_message(m, self._content_format) for m in messages]
        try:
            text = self._tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tokenize=False)
        except Exception:
            # A template that rejects this shape (e.g. tool turns) still gets a fair count.
            text = "\n".join("\n".join(text_parts(m.get("content"))) for m in messages)
        try:
            return PromptTokens.one(self._count(text))
        except _BeyondContext as beyond:
            return beyond.counted()

    def completion(self, prompt: Any) -> PromptTokens:
        """str, list of str, token ids, or list of token-id lists (a batch: one prompt per item)."""
        try:
            return self._completion(prompt)
        except _BeyondContext as beyond:
            return beyond.counted()

    def _completion(self, prompt: Any) -> PromptTokens:
        if isinstance(prompt, str):
            return PromptTokens.one(self._count(prompt))
        if not prompt:
            return PromptTokens.one(0)
        if all(isinstance(t, int) for t in prompt):
            return PromptTokens.one(len(prompt))
        try:
            counts = [self._completion(p).longest for p in prompt]
        except _BeyondContext as beyond:
            raise _BeyondContext(beyond.at_least, len(prompt)) from None
        return PromptTokens(max(counts), sum(counts), len(counts))
