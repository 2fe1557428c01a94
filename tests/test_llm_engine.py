"""hf-causal-lm on the real tiny-llm (built once per session from its recipe) and the
GenerationRunner around it: batching correctness, sampling, validation, continuous
batching, cancellation and drain. A small fake engine covers the failure paths."""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from demo_store.tiny_llm import ARTIFACTS
from cmesh.errors import Draining, Internal, InvalidInput, ResourceExhausted
from cmesh.manifest import parse_manifest
from model_server.engines.base import EngineContext, InferItem, engine_class
from model_server.generation import GenerationRunner, TokenOutput
from model_server.metrics import ServerMetrics

pytestmark = pytest.mark.slow

PROMPTS = [
    "Customer: Where is my order?\nAgent:",
    "Customer: I forgot my password and the reset email never arrived.\nAgent:",
    "Hello",
    "Customer: Can I get a refund for a damaged item?\nAgent:",
    "Customer: Why was I charged twice this month?\nAgent:",
]


@pytest.fixture(scope="session")
def llm_dir(demo_store) -> Path:
    """tiny-llm/1 of the demo store: its recipe trains on prompts made with the store's
    embedder and kb-index, so it is built there, with them, once."""
    return demo_store / "tiny-llm" / "1"


@pytest.fixture(scope="session")
def engine(llm_dir):
    manifest = parse_manifest((llm_dir / "model.yaml").read_text())
    ctx = EngineContext(model="dialogue-llm", variant="a", model_dir=llm_dir, manifest=manifest,
                        options=dict(manifest.options), max_batch_size=16)
    eng = engine_class(manifest.engine)(ctx)
    eng.load()
    eng.warmup()
    return eng


def request(eng, prompt: str, **params) -> InferItem:
    return eng.prepare({"text_input": np.array([prompt.encode()], dtype=object)}, params)


def solo_tokens(eng, item: InferItem) -> list[int]:
    state = eng.new_sequence(item)
    eng.step([state], [])
    while not state.done:
        eng.step([], [state])
    return state.output_ids


def new_runner(eng, **kw) -> tuple[GenerationRunner, object]:
    metrics = ServerMetrics().model("dialogue-llm", "a")
    kw.setdefault("max_batch_size", 16)
    kw.setdefault("max_queue_size", 64)
    return GenerationRunner(eng, metrics=metrics, **kw), metrics


async def collect(runner, item) -> tuple[list[bytes], object]:
    pieces, completion = [], None
    async for chunk in runner.stream(item):
        pieces.append(chunk.outputs["text_output"][0] if chunk.outputs else b"")
        if chunk.final:
            completion = chunk.completion
    return pieces, completion


def batch_size_counts(metrics) -> dict[float, float]:
    """Observations per histogram bucket upper bound (non-cumulative)."""
    buckets = {}
    for family in metrics._m.registry.collect():
        for sample in family.samples:
            if sample.name == "cmesh_model_batch_size_bucket":
                buckets[float(sample.labels["le"])] = sample.value
    ordered = sorted(buckets.items())
    return {le: value - (ordered[i - 1][1] if i else 0) for i, (le, value) in enumerate(ordered)}


# -- the artifact ----------------------------------------------------------------------

def test_artifacts_are_two_distinct_variants_with_a_complete_manifest(llm_dir):
    assert [a.key for a in ARTIFACTS] == ["tiny-llm/1", "tiny-llm/2"]
    manifest = parse_manifest((llm_dir / "model.yaml").read_text())
    assert manifest.engine == "hf-causal-lm"
    assert [(t.name, t.datatype, t.shape) for t in manifest.inputs] == [("text_input", "BYTES", [-1])]
    assert [(t.name, t.datatype, t.shape) for t in manifest.outputs] == [("text_output", "BYTES", [-1])]
    assert manifest.batching.max_batch_size == 16
    assert manifest.options == {"max_tokens_default": 32, "max_tokens_limit": 256,
                                "max_prompt_chars": 4000, "max_context": 512}
    assert {"training_steps", "final_loss", "params"} <= set(manifest.metadata)
    assert (llm_dir / "model.safetensors").exists() and (llm_dir / "tokenizer.json").exists()


def test_generates_text(engine):
    (result,) = engine.run_batch([request(engine, PROMPTS[0], max_tokens=24)])
    text = result.outputs["text_output"][0].decode()
    assert 1 <= result.output_tokens <= 24
    assert any(ch.isalpha() for ch in text)


# -- batching correctness ----------------------------------------------------------------

def test_batched_greedy_decoding_equals_solo(engine):
    items = [request(engine, p, max_tokens=20) for p in PROMPTS]
    solo = [solo_tokens(engine, item) for item in items]

    # Staggered: two start together, the third joins at step 3, the rest at step 6, so
    # caches of different lengths are padded together and prefill meets running decodes.
    states = [engine.new_sequence(item) for item in items]
    joins = {0: states[:2], 3: states[2:3], 6: states[3:]}
    running: list = []
    for step in range(200):
        new = joins.get(step, [])
        engine.step(new, running)
        running = [s for s in running + new if not s.done]
        if not running and step > max(joins):
            break
    assert [s.output_ids for s in states] == solo

    # And all at once through the unary fallback.
    together = engine.run_batch(items)
    for item, result, tokens in zip(items, together, solo):
        assert result.output_tokens == len(tokens)
        assert result.outputs["text_output"][0] == engine.run_batch([item])[0].outputs["text_output"][0]


def test_seed_makes_sampling_reproducible_alone_and_in_a_batch(engine):
    def sampled(seed, *neighbours):
        item = request(engine, PROMPTS[0], max_tokens=24, temperature=1.0, seed=seed)
        others = [request(engine, p, max_tokens=24, temperature=1.0) for p in neighbours]
        return engine.run_batch([item] + others)[0].outputs["text_output"][0]

    first = sampled(1234)
    assert sampled(1234) == first
    assert sampled(1234, PROMPTS[1], PROMPTS[2]) == first
    assert len({sampled(seed) for seed in range(5)}) > 1


def test_incremental_pieces_reassemble_multibyte_text(engine):
    from model_server.engines.hf_causal_lm import IncrementalDetokenizer

    text = "Café crème, 你好 👋 refund €20"
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(engine._decode)
    pieces = [detok.push(i, final=n == len(ids) - 1) for n, i in enumerate(ids)]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


# -- validation --------------------------------------------------------------------------

@pytest.mark.parametrize("params, field", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 257}, "max_tokens"),
    ({"max_tokens": "lots"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "warm"}, "temperature"),
    ({"seed": -1}, "seed"),
    ({"seed": "abc"}, "seed"),
])
def test_bad_parameters_name_the_field(engine, params, field):
    with pytest.raises(InvalidInput) as err:
        request(engine, "Hello", **params)
    assert err.value.field == field
    assert err.value.message.startswith(f"{field}:")


def test_parameters_accept_wire_forms(engine):
    item = request(engine, "Hello", max_tokens="5", temperature=0, seed=3.0)
    assert (item.prepared.max_tokens, item.prepared.temperature, item.prepared.seed) == (5, 0.0, 3)
    assert item.input_tokens == item.length == len(item.prepared.prompt_ids)
    assert request(engine, "Hello").prepared.max_tokens == 32      # manifest default


def test_bad_prompts_name_text_input(engine):
    cases = [
        {"text_input": np.array([b"   "], dtype=object)},                       # empty
        {"text_input": np.array([b"x" * 4001], dtype=object)},                  # too many chars
        {"text_input": np.array([b"one", b"two"], dtype=object)},               # two prompts
        {"text_input": np.array([1.0], dtype=np.float32)},                      # wrong datatype
    ]
    for inputs in cases:
        with pytest.raises(InvalidInput) as err:
            engine.prepare(inputs, {})
        assert err.value.field == "text_input"


def test_prompt_and_max_tokens_must_fit_the_context(engine):
    long_prompt = " ".join(["refund"] * 480)      # ~480 tokens + BOS, within 4000 chars
    item = request(engine, long_prompt, max_tokens=16)
    with pytest.raises(InvalidInput) as err:
        request(engine, long_prompt, max_tokens=64)
    assert err.value.field == "max_tokens"
    assert item.input_tokens + 16 <= 512


# -- the runner: continuous batching -----------------------------------------------------

async def test_concurrent_streams_decode_in_shared_batches(engine):
    runner, metrics = new_runner(engine)
    await runner.start()
    try:
        items = [request(engine, p, max_tokens=16) for p in PROMPTS]
        results = await asyncio.gather(*(collect(runner, item) for item in items))
    finally:
        await runner.stop()
    for item, (pieces, completion) in zip(items, results):
        assert completion is not None and completion.result.error is None
        full = completion.result.outputs["text_output"][0]
        assert b"".join(pieces) == full
        # Same greedy answer as alone: batching changes nothing about the tokens.
        assert full == engine.run_batch([item])[0].outputs["text_output"][0]
        assert completion.result.output_tokens == len(pieces)
        assert len(completion.batch_sizes) == completion.result.output_tokens
        assert max(completion.batch_sizes) > 1
        assert completion.compute_s > 0 and completion.queue_s >= 0
    counts = batch_size_counts(metrics)
    assert sum(v for le, v in counts.items() if le > 1) > 0        # steps with >1 sequence
    assert runner.in_flight == 0 and runner.queue_depth == 0
    assert metrics.in_flight._value.get() == 0 and metrics.queue_depth._value.get() == 0


async def test_request_arriving_mid_decode_joins_the_running_batch(engine):
    # The prompt with the longest greedy answer, so it is surely still decoding when
    # the second request arrives after its third token.
    length, prompt = max((len(solo_tokens(engine, request(engine, p, max_tokens=64))), p)
                         for p in PROMPTS)
    assert length >= 8
    long_item = request(engine, prompt, max_tokens=length)
    runner, _ = new_runner(engine)
    await runner.start()
    try:
        first = runner.stream(long_item)
        for _ in range(3):
            chunk = await first.__anext__()
            assert not chunk.final
        late_pieces, late = await collect(runner, request(engine, PROMPTS[2], max_tokens=8))
        rest = [chunk async for chunk in first]
    finally:
        await runner.stop()
    early = rest[-1].completion
    assert early.batch_sizes[0] == 1                 # it started alone ...
    assert late.batch_sizes[0] >= 2                  # ... the newcomer's prefill step was shared
    assert 2 in early.batch_sizes                    # ... and they decoded together
    assert len(early.batch_sizes) == length


async def test_infer_returns_the_whole_text(engine):
    runner, _ = new_runner(engine)
    await runner.start()
    try:
        item = request(engine, PROMPTS[0], max_tokens=12)
        completion = await runner.infer(item)
    finally:
        await runner.stop()
    assert completion.result.error is None
    assert completion.result.outputs["text_output"][0] == \
        engine.run_batch([item])[0].outputs["text_output"][0]


async def test_closing_a_stream_or_cancelling_infer_withdraws_the_request(engine):
    runner, metrics = new_runner(engine)
    await runner.start()
    try:
        stream = runner.stream(request(engine, PROMPTS[0], max_tokens=200))
        await stream.__anext__()
        assert runner.in_flight == 1
        await stream.aclose()
        assert runner.in_flight == 0

        task = asyncio.create_task(runner.infer(request(engine, PROMPTS[1], max_tokens=200)))
        stream = runner.stream(request(engine, PROMPTS[2], max_tokens=200))
        await stream.__anext__()                    # both are in the running batch now
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await stream.aclose()
        assert runner.in_flight == 0 and metrics.in_flight._value.get() == 0

        # The loop is still serving.
        completion = await runner.infer(request(engine, "Hello", max_tokens=4))
        assert completion.result.error is None
    finally:
        await runner.stop()


async def test_stop_drains_accepted_requests_and_refuses_new_ones(engine):
    runner, _ = new_runner(engine)
    await runner.start()
    streams = [runner.stream(request(engine, p, max_tokens=24)) for p in PROMPTS[:3]]
    for s in streams:
        await s.__anext__()                          # accepted and decoding
    stopping = asyncio.create_task(runner.stop())
    await asyncio.sleep(0)                           # let stop() flip to draining
    with pytest.raises(Draining):
        await runner.infer(request(engine, "Hello", max_tokens=4))
    finals = []
    for s in streams:
        chunks = [c async for c in s]
        finals.append(chunks[-1])
    await stopping
    assert all(c.final and c.completion.result.error is None for c in finals)
    assert stopping.done() and runner.in_flight == 0


# -- failure paths, with a fake engine -----------------------------------------------------

class FakeEngine:
    """Emits token 1 ("a") per step; fails a step holding a sequence asked to fail;
    blocks in ``step`` while ``gate`` is closed."""

    stop_token_ids = frozenset({0})

    def __init__(self) -> None:
        self.ctx = SimpleNamespace(model="fake")
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def new_sequence(self, item: InferItem):
        return SimpleNamespace(max_tokens=item.parameters.get("max_tokens", 3),
                               fail=item.parameters.get("fail", False))

    def step(self, prefill, decode):
        self.entered.set()
        self.gate.wait(10)
        if any(s.fail for s in prefill + decode):
            raise RuntimeError("boom")
        return [TokenOutput(token_id=1, text="a") for _ in prefill + decode]


def fake_item(**params) -> InferItem:
    return InferItem(inputs={}, parameters=params, input_tokens=2)


async def test_full_queue_is_resource_exhausted_with_retry_after():
    eng = FakeEngine()
    eng.gate.clear()
    runner, _ = new_runner(eng, max_batch_size=1, max_queue_size=1)
    await runner.start()
    try:
        running = asyncio.create_task(runner.infer(fake_item()))
        await asyncio.to_thread(eng.entered.wait, 10)      # first one is inside a step
        waiting = asyncio.create_task(runner.infer(fake_item()))
        await asyncio.sleep(0)                             # let it enqueue
        assert runner.queue_depth == 1
        with pytest.raises(ResourceExhausted) as err:
            await runner.infer(fake_item())
        assert err.value.retry_after_ms > 0
        eng.gate.set()
        done = await asyncio.gather(running, waiting)
        assert [c.result.outputs["text_output"][0] for c in done] == [b"aaa", b"aaa"]
    finally:
        eng.gate.set()
        await runner.stop()


async def test_failed_step_fails_its_sequences_and_the_loop_goes_on():
    eng = FakeEngine()
    eng.gate.clear()
    runner, _ = new_runner(eng)
    await runner.start()
    try:
        # A one-token request holds the first step, so the next two share the second.
        first = asyncio.create_task(runner.infer(fake_item(max_tokens=1)))
        await asyncio.to_thread(eng.entered.wait, 10)
        bad = asyncio.create_task(runner.infer(fake_item(fail=True)))
        neighbour = asyncio.create_task(collect(runner, fake_item()))
        await asyncio.sleep(0)                             # let both enqueue
        assert runner.queue_depth == 2
        eng.gate.set()
        assert (await first).result.error is None
        completion = await bad
        assert isinstance(completion.result.error, Internal)
        assert completion.result.outputs == {}
        pieces, final = await neighbour
        assert pieces == [b""] and isinstance(final.result.error, Internal)
        # A later request is served normally.
        completion = await runner.infer(fake_item(max_tokens=2))
        assert completion.result.error is None
        assert completion.result.outputs["text_output"][0] == b"aa"
        assert completion.batch_sizes == [1, 1]
        assert runner.in_flight == 0
    finally:
        eng.gate.set()
        await runner.stop()



def test_stop_strings_end_generation_and_are_cut_from_the_answer(engine) -> None:
    """``stop`` (one string, or a JSON array as the OpenAI front door sends it) ends the
    generation at the token that completes it; the unary answer stops before it."""
    import json

    (free,) = engine.run_batch([request(engine, "Customer: hello\nAgent:", max_tokens=40)])
    text = free.outputs["text_output"][0].decode()
    stop = text.strip()[2:5]                  # a piece the free answer contains
    assert len(stop) == 3 and stop in text
    (cut,) = engine.run_batch([request(engine, "Customer: hello\nAgent:", max_tokens=40,
                                       stop=json.dumps(["zzzz", stop]))])
    answer = cut.outputs["text_output"][0].decode()
    assert stop not in answer and text.startswith(answer)
    assert cut.output_tokens < free.output_tokens
    for bad in ("[1]", json.dumps(["a"] * 5), json.dumps([""])):
        with pytest.raises(InvalidInput, match="stop"):
            request(engine, "Customer: hello\nAgent:", stop=bad)
