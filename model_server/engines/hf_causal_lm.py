"""``hf-causal-lm``: token-streaming text generation with a Hugging Face causal LM.

The engine exposes a step-level API that ``model_server.generation`` drives:
``new_sequence`` (cheap, event loop) and ``step`` (one forward pass for the
sequences admitted this step, one for all the running ones; worker thread).
Each sequence keeps its own KV cache as per-layer ``[1, heads, len, head_dim]``
tensors. A step left-pads those caches to the longest, passes an explicit 4D
mask and explicit position ids, and splits the grown caches back, so sequences
of any length share one decode forward pass (iteration-level batching) while
every sequence attends only to its own tokens, at its own positions: a sequence
decodes to the same greedy tokens alone or in any batch.

Assumes a full-attention decoder whose cache layers hold dense key/value
tensors (GPT-2, Llama-style models); sliding-window caches are not handled.
``run_batch`` runs whole generations with the same steps, for callers that only
know the unary batch contract.
"""
from __future__ import annotations

import json
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cmesh.errors import InvalidInput
from model_server.engines.base import Engine, InferItem, ItemResult, decode_texts, register
from model_server.engines.torch_util import inference_threads, quiet_transformers, resolve_device
from model_server.generation.scheduler import TokenOutput

INPUT = "text_input"
OUTPUT = "text_output"
MAX_SEED = 2**63 - 1
MAX_TEMPERATURE = 2.0


# -- request parameters ----------------------------------------------------------------

def _as_int(name: str, value: Any) -> int:
    # OIP parameters arrive as int64, double or string params depending on the client.
    if isinstance(value, bool):
        raise InvalidInput(name, f"must be an integer, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise InvalidInput(name, f"must be an integer, got {value!r}")


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise InvalidInput(name, f"must be a number, got {value!r}")
    if isinstance(value, numbers.Real):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value.strip())
        except ValueError:
            raise InvalidInput(name, f"must be a number, got {value!r}") from None
    else:
        raise InvalidInput(name, f"must be a number, got {value!r}")
    if result != result:  # NaN compares unequal to itself
        raise InvalidInput(name, "must be a number, got NaN")
    return result


MAX_STOPS = 4                   # as OpenAI's API
MAX_STOP_CHARS = 64


def _stops(value: Any) -> tuple[str, ...]:
    """``stop``: one string, or a JSON array of up to four (InferParameter holds no list)."""
    if value is None or value == "":
        return ()
    if not isinstance(value, str):
        raise InvalidInput("stop", f"must be a string or a JSON array of strings, got {type(value).__name__}")
    stops: Any = [value]
    if value.startswith("["):
        try:
            stops = json.loads(value)
        except ValueError:
            stops = [value]
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise InvalidInput("stop", "a JSON array must hold strings only")
    if len(stops) > MAX_STOPS:
        raise InvalidInput("stop", f"at most {MAX_STOPS} stop strings, got {len(stops)}")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise InvalidInput("stop", f"each stop string must have 1 to {MAX_STOP_CHARS} characters")
    return tuple(stops)


@dataclass(frozen=True)
class GenerationParams:
    """One validated request: what ``prepare`` hands to the scheduler side."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float          # 0 = greedy
    seed: int | None
    stop: tuple[str, ...] = ()  # generation ends once the text contains one of them


# -- incremental detokenization --------------------------------------------------------

class IncrementalDetokenizer:
    """Turns generated token ids into text deltas that concatenate to the full text.

    A byte-level BPE token can end in the middle of a UTF-8 character; decoding
    then ends in U+FFFD until the next token completes it, so such a delta is held
    back. Only a small window is re-decoded per token (the vLLM/TGI offsets scheme),
    which is exact for byte-level decoding because it has no cross-token context.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0           # window start: a token boundary on a character boundary
        self._read = 0             # tokens up to here have been emitted as text

    def push(self, token_id: int, *, final: bool = False) -> str:
        """Add one token; return the new text it completes. ``final`` flushes whatever
        is held back (a truncated character then shows as U+FFFD)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        complete = len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd")
        if not (complete or final):
            return ""
        # Byte-level decoding only appends, so new_text extends prefix_text; the common
        # prefix keeps a tokenizer that rewrites earlier text from repeating it.
        delta = new_text[len(os.path.commonprefix([prefix_text, new_text])):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta


# -- per-sequence state ----------------------------------------------------------------

@dataclass(eq=False)
class SequenceState:
    """Compute-side state of one sequence. Touched only by the worker thread once
    the scheduler has admitted it."""

    params: GenerationParams
    stop_ids: frozenset[int]
    generator: Any                              # torch.Generator, or None when greedy
    detok: IncrementalDetokenizer
    past: list[tuple[Any, Any]] | None = None   # per layer (keys, values), [1, H, cached, D]
    cached: int = 0                             # tokens held in ``past``
    output_ids: list[int] = field(default_factory=list)
    stopped: bool = False                       # a stop string appeared in the text

    @property
    def max_tokens(self) -> int:
        return self.params.max_tokens

    @property
    def done(self) -> bool:
        return self.stopped or bool(self.output_ids) and (self.output_ids[-1] in self.stop_ids
                                                          or len(self.output_ids) >= self.params.max_tokens)

    def answer(self) -> str:
        """The whole text, cut before the first stop string (as OpenAI's ``stop``)."""
        text = self.detok.text
        cuts = [i for i in (text.find(s) for s in self.params.stop) if i >= 0]
        return text[:min(cuts)] if cuts else text


# -- the engine ------------------------------------------------------------------------

@register
class HFCausalLMEngine(Engine):
    kind = "hf-causal-lm"
    generative = True

    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        inference_threads(self.ctx.option("torch_threads"))
        quiet_transformers()
        self._torch = torch
        self.device = resolve_device(self.ctx.device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.ctx.model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(self.ctx.model_dir)).to(self.device).eval()
        config = self.model.config
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 512)
        self.max_context = min(int(self.ctx.option("max_context", positions)), int(positions))
        self.max_tokens_default = int(self.ctx.option("max_tokens_default", 32))
        self.max_tokens_limit = int(self.ctx.option("max_tokens_limit", 256))
        self.max_prompt_chars = int(self.ctx.option("max_prompt_chars", 4000))
        tok = self.tokenizer
        self.eos_id = tok.eos_token_id
        self.bos_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        # Pad slots are masked out, so any valid id will do.
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (self.eos_id or 0)
        self.stop_token_ids = frozenset(i for i in (self.eos_id,) if i is not None)
        self._backend_decode = tok.backend_tokenizer.decode

    def warmup(self) -> None:
        # Prefill and a couple of batched decode steps prime every kernel the step loop uses.
        inputs = {INPUT: np.array([b"Hello"], dtype=object)}
        items = [self.prepare(inputs, {"max_tokens": 3}) for _ in range(2)]
        self.run_batch(items)

    def unload(self) -> None:
        self.model = None

    # -- request validation (event loop; no model calls) ---------------------------------

    def prepare(self, inputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> InferItem:
        rows = self.check_inputs(inputs)
        if rows != 1:
            raise InvalidInput(INPUT, f"takes exactly one prompt per request, got {rows}")
        (text,) = decode_texts(INPUT, inputs[INPUT], max_chars=self.max_prompt_chars)
        params = parameters or {}

        max_tokens = _as_int("max_tokens", params.get("max_tokens", self.max_tokens_default))
        if not 1 <= max_tokens <= self.max_tokens_limit:
            raise InvalidInput("max_tokens", f"must be between 1 and {self.max_tokens_limit}, "
                                             f"got {max_tokens}")
        temperature = _as_float("temperature", params.get("temperature", 0.0))
        if not 0.0 <= temperature <= MAX_TEMPERATURE:
            raise InvalidInput("temperature", f"must be between 0 and {MAX_TEMPERATURE:g} "
                                              f"(0 = greedy), got {temperature:g}")
        seed = params.get("seed")
        if seed is not None:
            seed = _as_int("seed", seed)
            if not 0 <= seed <= MAX_SEED:
                raise InvalidInput("seed", f"must be between 0 and {MAX_SEED}, got {seed}")

        ids = [self.bos_id] + self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) + max_tokens > self.max_context:
            room = self.max_context - len(ids)
            if room < 1:
                raise InvalidInput(INPUT, f"prompt is {len(ids)} tokens; the context holds "
                                          f"{self.max_context} including the answer")
            raise InvalidInput("max_tokens", f"prompt of {len(ids)} tokens leaves room for "
                                             f"{room} new tokens, {max_tokens} requested")
        prepared = GenerationParams(prompt_ids=tuple(ids), max_tokens=max_tokens,
                                    temperature=temperature, seed=seed, stop=_stops(params.get("stop")))
        return InferItem(inputs=inputs, parameters=params, rows=1, length=len(ids),
                         input_tokens=len(ids), prepared=prepared)

    # -- step-level API (driven by model_server.generation) ------------------------------

    def new_sequence(self, item: InferItem) -> SequenceState:
        """Compute-side state for a prepared request. Cheap; allocates no cache."""
        params: GenerationParams = item.prepared
        generator = None
        if params.temperature > 0:
            generator = self._torch.Generator(device=self.device)
            if params.seed is None:
                generator.seed()            # fresh entropy: unseeded requests differ
            else:
                generator.manual_seed(params.seed)
        return SequenceState(params=params, stop_ids=self.stop_token_ids, generator=generator,
                             detok=IncrementalDetokenizer(self._decode))

    def step(self, prefill: list[SequenceState], decode: list[SequenceState]) -> list[TokenOutput]:
        """One scheduler step: prefill the new sequences (one forward pass, left-padded
        prompts) and decode one token for all running ones (one forward pass). Returns
        one output per sequence, in the order ``prefill + decode``. State changes only
        after a forward pass succeeded, so a failed step leaves the sequences intact."""
        torch = self._torch
        outputs: list[TokenOutput] = []
        with torch.inference_mode():
            if prefill:
                new = [list(s.params.prompt_ids) for s in prefill]
                logits, pasts = self._forward([None] * len(prefill), [0] * len(prefill), new)
                outputs += self._advance(prefill, new, logits, pasts)
            if decode:
                new = [[s.output_ids[-1]] for s in decode]
                logits, pasts = self._forward([s.past for s in decode], [s.cached for s in decode], new)
                outputs += self._advance(decode, new, logits, pasts)
        return outputs

    def run_batch(self, items: list[InferItem]) -> list[ItemResult]:
        """Unary fallback: whole generations, batched step by step."""
        states = [self.new_sequence(item) for item in items]
        self.step(states, [])
        while active := [s for s in states if not s.done]:
            self.step([], active)
        return [ItemResult(outputs={OUTPUT: np.array([s.answer().encode("utf-8")], dtype=object)},
                           output_tokens=len(s.output_ids)) for s in states]

    # -- internals ------------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        return self._backend_decode(ids, skip_special_tokens=True)

    def _advance(self, states: list[SequenceState], new: list[list[int]], logits,
                 pasts: list[list[tuple[Any, Any]]]) -> list[TokenOutput]:
        tokens = self._sample(states, logits)
        outputs = []
        for state, fed, past, token in zip(states, new, pasts, tokens):
            state.past = past
            state.cached += len(fed)
            state.output_ids.append(token)
            text = state.detok.push(token, final=state.done)
            if state.params.stop and text and any(s in state.detok.text for s in state.params.stop):
                state.stopped = True
            outputs.append(TokenOutput(token_id=token, text=text, stopped=state.stopped))
        return outputs

    def _sample(self, states: list[SequenceState], logits) -> list[int]:
        torch = self._torch
        greedy = torch.argmax(logits, dim=-1).tolist()
        tokens = []
        for row, state in enumerate(states):
            temperature = state.params.temperature
            if temperature <= 0:
                tokens.append(int(greedy[row]))
                continue
            # Each sequence draws from its own generator, so its samples do not depend
            # on which other sequences share the step.
            probs = torch.softmax(logits[row].float() / temperature, dim=-1)
            tokens.append(int(torch.multinomial(probs, 1, generator=state.generator).item()))
        return tokens

    def _forward(self, pasts: list, past_lens: list[int], new: list[list[int]]):
        """One forward pass over rows with different cached lengths and different
        numbers of new tokens. Layout per row: [pad | its cache | pad | its new tokens],
        with the caches right-aligned at slot P and the new tokens at the end.
        Returns (last-position logits [B, vocab], per-row grown caches)."""
        from transformers import DynamicCache

        torch = self._torch
        dev = self.device
        rows = len(new)
        P = max(past_lens)
        N = max(len(ids) for ids in new)
        K = P + N

        input_ids = torch.full((rows, N), self.pad_id, dtype=torch.long)
        position_ids = torch.zeros((rows, N), dtype=torch.long)
        key_ok = torch.zeros((rows, K), dtype=torch.bool)
        for i, (ids, p) in enumerate(zip(new, past_lens)):
            n = len(ids)
            input_ids[i, N - n:] = torch.tensor(ids, dtype=torch.long)
            position_ids[i, N - n:] = torch.arange(p, p + n)
            key_ok[i, P - p:P] = True
            key_ok[i, K - n:] = True
        query_slot = P + torch.arange(N)
        causal = torch.arange(K)[None, :] <= query_slot[:, None]           # [N, K]
        allowed = key_ok[:, None, :] & causal[None]                         # [B, N, K]
        # Every query sees at least its own slot, so padded query rows stay finite.
        allowed[:, torch.arange(N), query_slot] = True
        dtype = self.model.dtype
        mask = torch.zeros((rows, 1, N, K), dtype=dtype)
        mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)

        cache = DynamicCache(config=self.model.config)
        if P > 0:
            layers = []
            template = next(past for past, p in zip(pasts, past_lens) if p > 0)
            for layer, (k0, v0) in enumerate(template):
                keys = k0.new_zeros((rows, k0.shape[1], P, k0.shape[3]))
                values = v0.new_zeros((rows, v0.shape[1], P, v0.shape[3]))
                for i, (past, p) in enumerate(zip(pasts, past_lens)):
                    if p:
                        keys[i, :, P - p:] = past[layer][0][0]
                        values[i, :, P - p:] = past[layer][1][0]
                layers.append((keys, values))
            cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)

        out = self.model(input_ids=input_ids.to(dev), attention_mask=mask.to(dev),
                         position_ids=position_ids.to(dev), past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :]

        grown = []
        for i, (ids, p) in enumerate(zip(new, past_lens)):
            n = len(ids)
            per_layer = []
            for layer in out.past_key_values.layers:
                k, v = layer.keys[i:i + 1], layer.values[i:i + 1]
                if n == N:      # cache and new tokens are adjacent: one slice
                    per_layer.append((k[:, :, P - p:], v[:, :, P - p:]))
                else:
                    per_layer.append((torch.cat([k[:, :, P - p:P], k[:, :, K - n:]], dim=2),
                                      torch.cat([v[:, :, P - p:P], v[:, :, K - n:]], dim=2)))
            grown.append(per_layer)
        return logits, grown
