"""The JSON OpenAI's clients read: whole answers and stream chunks of chat
completions and of (legacy) completions, in one place."""
from __future__ import annotations

from dataclasses import dataclass


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass(frozen=True)
class Shape:
    """One answer's identity: ``chat`` (chat.completion) or not (text_completion)."""

    chat: bool
    id: str
    created: int
    model: str
    include_usage: bool = False

    def _envelope(self, choices: list, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def whole(self, text: str, finish_reason: str, use: dict, extra: dict | None = None) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": finish_reason, "logprobs": None}
            body = self._envelope([choice], "chat.completion")
        else:
            body = self._envelope([{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
                                  "text_completion")
        body["usage"] = use
        body.update(extra or {})
        return body

    def chunk(self, text: str | None = None, finish_reason: str | None = None, *, first: bool = False) -> dict:
        if self.chat:
            delta: dict = {"role": "assistant", "content": ""} if first else {}
            if text is not None:
                delta["content"] = text
            body = self._envelope([{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                    "logprobs": None}], "chat.completion.chunk")
        else:
            body = self._envelope([{"index": 0, "text": text or "", "finish_reason": finish_reason,
                                    "logprobs": None}], "text_completion")
        if self.include_usage:
            body["usage"] = None          # OpenAI: null on every chunk but the usage one
        return body

    def usage_chunk(self, use: dict, extra: dict | None = None) -> dict:
        body = self._envelope([], "chat.completion.chunk" if self.chat else "text_completion")
        body["usage"] = use
        body.update(extra or {})
        return body
