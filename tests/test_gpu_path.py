"""The engines' accelerator paths, checked against the CPU (``gpu`` marker).

``hf-encoder``, ``text-classifier`` and ``torch`` must give the CPU's numbers within
a tolerance, and ``hf-causal-lm`` the CPU's greedy tokens, alone and in a batch; a
served model must batch concurrent requests and decode concurrent streams together;
a replica forked from the autoscaler's fork server must still get the device.

Where they run: CMESH_GPU_TEST_DEVICE names the accelerator (``cuda``, ``cuda:N``, or
``cpu`` to let the CPU stand in for it, as the GPU check's dry run does: the same
comparisons, batching and fork checks then run on the CPU). Unset, it is ``cuda``
where torch sees a GPU; elsewhere (CI) these tests skip. ``loadtest.gpu_check``'s
run.sh also sets CMESH_GPU_TEST_STORE (the model store; default the demo store),
CMESH_GPU_TEST_SERVER / _METRICS_PORT / _SERVER_PID (a model server it started
with the models on the device; default: one started here) and
CMESH_GPU_TEST_REPORT (a JSON-lines file the measured differences go to);
CMESH_GPU_TEST_QUICK=1 (the dry run) sends fewer requests.
"""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cmesh.client import AsyncClient, build_request
from model_server.engines.base import EngineContext, engine_class


def _accelerator() -> tuple[str, str]:
    wanted = os.environ.get("CMESH_GPU_TEST_DEVICE", "").strip()
    if wanted:
        return wanted, ""
    if torch.cuda.is_available():
        return "cuda", ""
    return "", ("needs CUDA: torch.cuda.is_available() is False on this machine "
                "(CMESH_GPU_TEST_DEVICE=cpu runs these checks with the CPU as the accelerator)")


ACCEL, NO_ACCEL = _accelerator()
QUICK = os.environ.get("CMESH_GPU_TEST_QUICK") == "1"
pytestmark = [pytest.mark.gpu, pytest.mark.slow, pytest.mark.skipif(not ACCEL, reason=NO_ACCEL)]

# fp32 on both sides: CUDA and CPU kernels differ in summation order only (~1e-6);
# a wrong dtype (fp16, TF32) or a wrong mask shows as 1e-3 and more.
ENCODER_TOL = 1e-3
CLASSIFIER_TOL = 1e-4
TORCH_TOL = 1e-4
LLM_TIE = 1e-3          # a greedy choice may differ only where the CPU's top two logits tie

TEXTS = [
    "hi",
    "How do I reset my password if I no longer have access to my email?",
    "Where is my order 1042 and when will it arrive?",
    "I was charged twice for the same subscription this month.",
    "Can I change the shipping address after the order has shipped?",
    "What is your return policy for damaged items? " * 12,          # long: runs into truncation
    "The app crashes every time I open the settings page.",
    "Do you ship internationally to Canada and Mexico?",
    "Please cancel my order, I bought the wrong size.",
    "thanks!",
    "My tracking number says delivered but nothing arrived at the door.",
    "I want to update the phone number on my account.",
] * (1 if QUICK else 2)
PROMPTS = [
    "Customer: Where is my order?\nAgent:",
    "Customer: I forgot my password and the reset email never arrived.\nAgent:",
    "Hello",
    "Customer: Can I get a refund for a damaged item?\nAgent:",
    "Customer: Why was I charged twice this month?\nAgent:",
]


# -- helpers --------------------------------------------------------------------------

def record(section: str, **values) -> None:
    """Measured values for the GPU check's summary (a no-op outside it)."""
    path = os.environ.get("CMESH_GPU_TEST_REPORT")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"section": section, "values": values}, default=float) + "\n")


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def device_of(module) -> torch.device:
    return next(module.parameters()).device


def texts(values: list[str]) -> np.ndarray:
    return np.array([t.encode() for t in values], dtype=object)


def load_engine(store: Path, source: str, device: str, *, max_batch: int = 32, model: str = "m"):
    from cmesh.store import ModelStore

    version = ModelStore(str(store)).open(source)
    ctx = EngineContext(model=model, variant="default", model_dir=version.local_dir, manifest=version.manifest,
                        device=device, options=dict(version.manifest.options), max_batch_size=max_batch)
    engine = engine_class(version.manifest.engine)(ctx)
    engine.load()
    engine.warmup()
    return engine


def maps_cuda(pid: int | str) -> bool | None:
    """Whether process ``pid`` has the CUDA driver library mapped (None: cannot read)."""
    try:
        return "libcuda.so" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None


def cuda_evidence_works() -> bool:
    """/proc maps tell a CUDA process apart only if this (CUDA-using) process shows it."""
    if not ACCEL.startswith("cuda"):
        return False
    torch.zeros(1, device=ACCEL)
    return bool(maps_cuda("self"))


def final_params(response) -> dict:
    return {k: v for k, v in response.parameters.items()}


# -- fixtures -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def store(request) -> Path:
    path = os.environ.get("CMESH_GPU_TEST_STORE")
    return Path(path) if path else request.getfixturevalue("demo_store")


class EnginePairs:
    """Each source loaded once on the CPU and once on the accelerator."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self._pairs: dict[str, tuple] = {}

    def __call__(self, source: str) -> tuple:
        if source not in self._pairs:
            self._pairs[source] = (load_engine(self.store, source, "cpu"),
                                   load_engine(self.store, source, ACCEL))
        return self._pairs[source]


@pytest.fixture(scope="module")
def engines(store) -> EnginePairs:
    return EnginePairs(store)


class Served:
    def __init__(self, address: str, metrics_port: str | int | None, pid: str | int | None) -> None:
        self.address, self.metrics_port, self.pid = address, metrics_port, pid

    def sample(self, name: str, **labels: str) -> float | None:
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        if not self.metrics_port:
            return None
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return 0.0

    def batches(self, model: str, variant: str = "default") -> tuple[float, float] | None:
        count = self.sample("cmesh_model_batch_size_count", model=model, variant=variant)
        total = self.sample("cmesh_model_batch_size_sum", model=model, variant=variant)
        return None if count is None else (count, total)


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    """The model server on the accelerator: run.sh's, or one started here."""
    if os.environ.get("CMESH_GPU_TEST_SERVER"):
        yield Served(os.environ["CMESH_GPU_TEST_SERVER"], os.environ.get("CMESH_GPU_TEST_METRICS_PORT"),
                     os.environ.get("CMESH_GPU_TEST_SERVER_PID"))
        return
    import yaml

    from loadtest.gpu_check import SERVED_MODELS, device_mesh
    from meshtest import ServerProcess

    path = tmp_path_factory.mktemp("gpu-server") / "mesh.yaml"
    path.write_text(yaml.safe_dump(device_mesh(str(store), ACCEL)))
    proc = ServerProcess(path, list(SERVED_MODELS), "--log-level", "WARNING")
    try:
        yield Served(proc.address, proc.metrics_port, proc.proc.pid)
    finally:
        proc.stop()


@pytest.fixture()
async def client(server):
    c = AsyncClient(server.address)
    yield c
    await c.close()


# -- engines in-process: accelerator vs CPU -------------------------------------------

def test_encoder_embeddings_match_cpu(engines) -> None:
    cpu, accel = engines("store://minilm-l6/1")
    assert device_of(accel.model).type == torch.device(ACCEL).type
    assert device_of(cpu.model).type == "cpu"
    assert accel.model.dtype == torch.float32          # fp16-stored weights compute in fp32
    ref, got = cpu.embed(TEXTS), accel.embed(TEXTS)
    assert got.shape == ref.shape == (len(TEXTS), 384) and np.isfinite(got).all()
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    diff = max_abs_diff(got, ref)
    record("cuda_equals_cpu", encoder_max_abs_diff=diff)
    assert diff <= ENCODER_TOL
    # The tolerance tells embeddings apart: another text's embedding is far outside it.
    assert max_abs_diff(np.roll(ref, 1, axis=0), ref) > 50 * ENCODER_TOL


def test_classifier_logits_and_labels_match_cpu(engines) -> None:
    cpu, accel = engines("store://intent-classifier/1")
    assert device_of(accel.model).type == torch.device(ACCEL).type
    ref = cpu.run_batch([cpu.prepare({"text": texts(TEXTS)}, {})])[0].outputs
    got = accel.run_batch([accel.prepare({"text": texts(TEXTS)}, {})])[0].outputs
    diff = max_abs_diff(got["probabilities"], ref["probabilities"])
    labels_equal = got["label"].tolist() == ref["label"].tolist()
    record("cuda_equals_cpu", classifier_max_abs_diff=diff, classifier_labels_equal=labels_equal)
    assert labels_equal
    assert diff <= CLASSIFIER_TOL
    assert len(set(ref["label"].tolist())) > 3                 # the texts span several intents
    assert max_abs_diff(np.roll(ref["probabilities"], 1, axis=0), ref["probabilities"]) > 50 * CLASSIFIER_TOL


class _Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        self.a = torch.nn.Parameter(torch.randn(16, 64, generator=gen) / 4)
        self.b = torch.nn.Parameter(torch.randn(64, 8, generator=gen) / 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.nn.functional.gelu(x @ self.a)
        logits = h @ self.b
        return logits, torch.softmax(logits, dim=-1)


def test_torchscript_engine_matches_cpu(tmp_path) -> None:
    from cmesh.manifest import Manifest, dump_manifest
    from model_server.engines.torchscript import quiet_jit

    version = tmp_path / "mlp" / "1"
    version.mkdir(parents=True)
    with quiet_jit():
        torch.jit.script(_Mlp()).save(str(version / "model.pt"))
    manifest = Manifest(name="mlp", version="1", engine="torch",
                        inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
                        outputs=[{"name": "logits", "datatype": "FP32", "shape": [-1, 8]},
                                 {"name": "probs", "datatype": "FP32", "shape": [-1, 8]}],
                        batching={"max_batch_size": 16})
    (version / "model.yaml").write_text(dump_manifest(manifest))
    cpu, accel = (load_engine(tmp_path, "store://mlp/1", d) for d in ("cpu", ACCEL))
    assert device_of(accel.module).type == torch.device(ACCEL).type
    rng = np.random.default_rng(3)
    inputs = [rng.normal(size=(rows, 16)).astype(np.float32) for rows in (1, 3, 5, 2)]

    def run(engine):      # four requests of different sizes, one batch
        results = engine.run_batch([engine.prepare({"x": x}, {}) for x in inputs])
        assert all(r.error is None for r in results), [r.error for r in results]
        return [r.outputs for r in results]

    diffs = [max_abs_diff(g[name], r[name]) for g, r in zip(run(accel), run(cpu)) for name in ("logits", "probs")]
    record("cuda_equals_cpu", torch_engine_max_abs_diff=max(diffs))
    assert max(diffs) <= TORCH_TOL


def _greedy_alone(engine, prompt: str, max_tokens: int) -> list[int]:
    state = engine.new_sequence(engine.prepare({"text_input": texts([prompt])}, {"max_tokens": max_tokens}))
    engine.step([state], [])
    while not state.done:
        engine.step([], [state])
    return state.output_ids


def _greedy_batched(engine, prompts: list[str], max_tokens: int) -> list[list[int]]:
    """All prompts prefilled together, then decoded together, ragged ends and all."""
    states = [engine.new_sequence(engine.prepare({"text_input": texts([p])}, {"max_tokens": max_tokens - i}))
              for i, p in enumerate(prompts)]
    engine.step(states, [])
    while active := [s for s in states if not s.done]:
        engine.step([], active)
    return [s.output_ids for s in states]


def _tie_at_divergence(cpu, prompt: str, ref: list[int], got: list[int]) -> float | None:
    """Where two greedy runs part, the CPU's logit margin between the two choices
    (None when they do not part)."""
    k = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
    if k is None:
        return None
    ids = list(cpu.prepare({"text_input": texts([prompt])}, {}).prepared.prompt_ids) + ref[:k]
    with torch.inference_mode():
        logits = cpu.model(input_ids=torch.tensor([ids])).logits[0, -1]
    return float(abs(logits[ref[k]] - logits[got[k]]))


@pytest.mark.parametrize("source", ["store://tiny-llm/1", "store://tiny-llm/2"])
def test_llm_greedy_tokens_match_cpu(engines, source) -> None:
    cpu, accel = engines(source)
    assert device_of(accel.model).type == torch.device(ACCEL).type
    max_tokens = 24
    refs = [_greedy_alone(cpu, p, max_tokens - i) for i, p in enumerate(PROMPTS)]
    alone = [_greedy_alone(accel, p, max_tokens - i) for i, p in enumerate(PROMPTS)]
    batched = _greedy_batched(accel, PROMPTS, max_tokens)
    mismatched, ties = 0, []
    for prompt, ref, a, b in zip(PROMPTS, refs, alone, batched):
        for got in (a, b):
            if got != ref:
                mismatched += 1
                ties.append(_tie_at_divergence(cpu, prompt, ref, got))
    key = source.removeprefix("store://").replace("-", "_").replace("/", "_")      # tiny_llm_1
    record("cuda_equals_cpu", **{f"{key}_tokens_equal": mismatched == 0, f"{key}_mismatches": mismatched,
                                 f"{key}_tokens_compared": sum(len(r) for r in refs) * 2})
    assert sum(len(r) for r in refs) > len(PROMPTS)             # something was generated
    # A mismatch is acceptable only at an exact tie of the CPU's top two logits.
    assert all(t is not None and t < LLM_TIE for t in ties), (mismatched, ties)


# -- served on the accelerator --------------------------------------------------------

async def test_served_models_match_cpu(engines, server, client) -> None:
    enc_cpu, _ = engines("store://minilm-l6/1")
    cls_cpu, _ = engines("store://intent-classifier/1")
    llm_cpu, _ = engines("store://tiny-llm/1")
    embeddings = await asyncio.gather(*(client.infer("embedder", {"text": texts([t])}, timeout=60)
                                        for t in TEXTS))
    got = np.concatenate([r.outputs["embedding"] for r in embeddings])
    enc_diff = max_abs_diff(got, enc_cpu.embed(TEXTS))
    classified = await client.infer("intent-classifier", {"text": texts(TEXTS)}, timeout=60)
    ref = cls_cpu.run_batch([cls_cpu.prepare({"text": texts(TEXTS)}, {})])[0].outputs
    cls_diff = max_abs_diff(classified.outputs["probabilities"], ref["probabilities"])
    answers = await asyncio.gather(*(client.infer("dialogue-llm", {"text_input": texts([p])}, version="a",
                                                  parameters={"max_tokens": 20, "temperature": 0.0}, timeout=60)
                                     for p in PROMPTS))
    ref_text = [llm_cpu.run_batch([llm_cpu.prepare({"text_input": texts([p])}, {"max_tokens": 20})])[0]
                .outputs["text_output"][0] for p in PROMPTS]
    texts_equal = [a.outputs["text_output"][0] for a in answers] == ref_text
    evidence = cuda_evidence_works()
    on_device = maps_cuda(server.pid) if evidence and server.pid else None
    record("cuda_equals_cpu", served_encoder_max_abs_diff=enc_diff, served_classifier_max_abs_diff=cls_diff,
           served_classifier_labels_equal=classified.outputs["label"].tolist() == ref["label"].tolist(),
           served_llm_text_equal=texts_equal, server_has_cuda_mapped=on_device)
    assert enc_diff <= ENCODER_TOL
    assert cls_diff <= CLASSIFIER_TOL
    assert classified.outputs["label"].tolist() == ref["label"].tolist()
    assert texts_equal
    if evidence and server.pid:
        assert on_device, "the model server process never loaded the CUDA driver"


async def test_concurrent_requests_form_batches(server, client) -> None:
    found = {}
    for model, n in (("embedder", 48 if QUICK else 96), ("intent-classifier", 64 if QUICK else 128)):
        before = server.batches(model)
        results = await asyncio.gather(*(client.infer(model, {"text": texts([TEXTS[i % len(TEXTS)]])}, timeout=60)
                                         for i in range(n)))
        sizes = [r.parameters["cmesh-batch-size"] for r in results]
        after = server.batches(model)
        found[f"{model}_max_batch"] = max(sizes)
        if before is not None:
            batches, rows = after[0] - before[0], after[1] - before[1]
            assert rows >= n
            found[f"{model}_mean_batch"] = round(rows / batches, 2)
            assert batches < rows, f"{model}: {n} concurrent requests ran as {batches:.0f} batches"
        assert max(sizes) > 1, f"{model}: every one of {n} concurrent requests ran alone"
    record("batching", **found)


async def test_continuous_decoding_is_batched(engines, server, client) -> None:
    llm_cpu, _ = engines("store://tiny-llm/1")
    streams = 6 if QUICK else 8
    prompts = [f"Customer: question number {i} about my order\nAgent:" for i in range(streams)]
    lengths = [16 + 3 * i for i in range(streams)]
    before = server.batches("dialogue-llm", "a")

    async def one_stream(i: int) -> tuple[str, dict]:
        request = build_request("dialogue-llm", {"text_input": texts([prompts[i]])}, version="a",
                                request_id=f"gpu-{i}", parameters={"max_tokens": lengths[i], "temperature": 0.0})
        pieces, final = [], {}
        async for response in client.stream([request], timeout=120):
            assert response.error_message == "", response.error_message
            r = response.infer_response
            pieces.append(r.raw_output_contents[0][4:].decode())
            if r.parameters["triton_final_response"].bool_param:
                final = final_params(r)
        return "".join(pieces), final

    results = await asyncio.gather(*(one_stream(i) for i in range(streams)))
    after = server.batches("dialogue-llm", "a")
    shared = sum(final["cmesh-batch-size"].int64_param > 1 for _, final in results)
    values = {"decode_streams_sharing_steps": shared}
    if before is not None:
        steps, rows = after[0] - before[0], after[1] - before[1]
        values["decode_mean_batch"] = round(rows / steps, 2)
        assert rows / steps > 1.5, "concurrent streams should share decode steps"
    record("batching", **values)
    assert shared >= len(results) // 2
    # Decoding among others gives each stream the CPU's greedy answer alone.
    for (text, _), prompt, n in zip(results, prompts, lengths):
        ref = llm_cpu.run_batch([llm_cpu.prepare({"text_input": texts([prompt])}, {"max_tokens": n})])[0]
        assert text.encode() == ref.outputs["text_output"][0]


# -- the fork server ------------------------------------------------------------------

def _parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


async def test_forked_replica_gets_the_accelerator(engines, store, tmp_path) -> None:
    import yaml

    from autoscaler.providers.local import LocalProvider
    from cmesh.config import load_config
    from loadtest.gpu_check import device_mesh

    enc_cpu, _ = engines("store://minilm-l6/1")
    mesh = device_mesh(str(Path(store).resolve()), ACCEL)
    mesh["models"] = {"embedder": mesh["models"]["embedder"]}
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump(mesh))
    state = tmp_path / "state"
    provider = LocalProvider(load_config(path), path, state_dir=state, grace_s=5, zygote=True)
    ready = asyncio.Event()
    provider.subscribe(lambda: ready.set() if any(r.state == "ready" for r in provider.replicas()) else None)
    try:
        await provider.start()
        forks = [line.split()[1] for line in (state / "processes.log").read_text().splitlines()
                 if line.startswith("fork-server ")]
        assert forks, "the fork server did not start"
        await provider.scale("embedder", "serverless", 1, ["gpu0"])
        try:
            await asyncio.wait_for(ready.wait(), timeout=180)
        except TimeoutError:
            logs = "".join(p.read_text()[-1500:] for p in (state / "logs").glob("*.log"))
            pytest.fail(f"the forked replica did not become ready on {ACCEL}:\n{logs}")
        (replica,) = [r for r in provider.replicas() if r.state == "ready"]
        pid = replica.info["pid"]
        forked = _parent_pid(pid) == int(forks[-1])
        c = AsyncClient(replica.address)
        try:
            r = await c.infer("embedder", {"text": texts(TEXTS[:8])}, timeout=60)
        finally:
            await c.close()
        diff = max_abs_diff(r.outputs["embedding"], enc_cpu.embed(TEXTS[:8]))
        evidence = cuda_evidence_works()
        on_device = maps_cuda(pid) if evidence else None
        record("forked_replica", device=ACCEL, forked_from_fork_server=forked, max_abs_diff=diff,
               cold_start_s=replica.cold_start_s, has_cuda_mapped=on_device)
        assert forked, "the replica was not forked from the fork server"
        assert diff <= ENCODER_TOL
        if evidence:
            assert on_device, "the forked replica never loaded the CUDA driver"
    finally:
        await provider.close()
