"""Chat messages into a prompt, and stop sequences out of a token stream.

The template is the model's own: ``metadata.chat_template`` of its store manifest
(a Jinja template over ``messages`` and ``add_generation_prompt``, the format
Hugging Face tokenizers and vLLM use), rendered in Jinja's immutable sandbox so a
template cannot reach Python. A model without one gets ``DEFAULT_TEMPLATE``.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from cmesh.errors import FailedPrecondition
from cmesh.manifest import Manifest

DEFAULT_TEMPLATE = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                    "{% if add_generation_prompt %}assistant:{% endif %}")
_ENV = ImmutableSandboxedEnvironment(trim_blocks=False, autoescape=False)


@lru_cache(maxsize=64)
def _compiled(source: str):
    return _ENV.from_string(source)


def render_chat(manifest: Manifest, model: str, messages: Sequence[dict]) -> str:
    source = manifest.metadata.get("chat_template") or DEFAULT_TEMPLATE
    try:
        return _compiled(source).render(messages=list(messages), add_generation_prompt=True)
    except TemplateError as exc:
        # The operator's template, not the caller's input, is at fault.
        raise FailedPrecondition(f"chat template of {model!r} failed: {exc}", component=model) from None


class StopCutter:
    """Cuts a streamed text before the first stop sequence. Text that might be the
    start of one is held back until the next piece tells; once a stop is seen the
    rest is dropped (the engine stops generating at it, ``hf_causal_lm``)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return piece
        text = self.held + piece
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped, self.held = True, ""
            return text[:min(cuts)]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        held, self.held = ("" if self.stopped else self.held), ""
        return held
