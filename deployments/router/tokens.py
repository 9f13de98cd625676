"""Count a prompt's tokens the way the engine will: served tokenizer, after the chat template."""

from __future__ import annotations

from typing import Any, Iterable, Mapping


def _text_of(content: Any) -> str:
    """Message content as text: a string, or the text parts of a content-part list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))


class PromptTokenCounter:
    def __init__(self, tokenizer_source: str):
        from transformers import AutoTokenizer  # heavy; only in the router replica

        self._tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)

    def _count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False))

    def chat(self, messages: Iterable[Mapping[str, Any]]) -> int:
        plain = [{"role": m.get("role", "user"), "content": _text_of(m.get("content"))} for m in messages]
        try:
            text = self._tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
        except Exception:
            # A template that rejects this shape (e.g. tool turns) still gets a fair count.
            text = "\n".join(m["content"] for m in plain)
        return self._count(text)

    def completion(self, prompt: Any) -> int:
        """str, list of str, token ids, or list of token-id lists: the longest prompt counts."""
        if isinstance(prompt, str):
            return self._count(prompt)
        if not prompt:
            return 0
        if all(isinstance(t, int) for t in prompt):
            return len(prompt)
        return max(self.completion(p) for p in prompt)
