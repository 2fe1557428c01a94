"""``cmesh profile MODEL``: measure a model's profile on this machine, from real replicas.

For each model: start a real replica ``--cold-starts`` times as the mesh
starts one (the local provider, its fork server included; the model as
``mesh.yaml`` configures it, batching included) and time each from asking to
ready; then,
on one replica, send ``b`` concurrent single-row requests for each batch size
``b`` (1, 2, 4, ... up to the model's ``max_batch_size``; the replica's batcher
groups them) ``--repeats`` times and keep the median of the slowest answer:
the latency of one batch of ``b``. Generative models get the batching kind
``continuous``.

What each model is sent is what its pipeline sends it. Models are measured in
pipeline order, and a pipeline node's input and params are its own
expressions (``router.pipelines.calls.node_inputs``, the router's code)
evaluated on the request text and on what the upstream models answered for
that text: the vector index gets the embedder's vectors, the SQL tool the
query and the order id, the LLM the prompt with the retrieved passages and
the order row (an LLM's latency is its prompt's and answer's length), streamed
where the node streams (each piece is a message). A node
whose ``when`` is false for a text is not sent that text, as in the pipeline.
The texts are the request texts of ``--scenario`` (every class that reaches
the model), else a built-in set. The outputs that downstream ``when``
conditions read (``intent.label``) are recorded per text
(``outputs_by_text``) and as a distribution (``outputs``), so the simulator
takes the branches the real models take.

Writes the profiles as YAML (``sim.profiles``), with ``measured:`` saying
how, where and when. A model the command cannot drive (no pipeline node and
no text input) is reported and left out: declare it in the YAML.
"""
from __future__ import annotations

import asyncio
import os
import platform
import re
import secrets
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmesh.config import MeshConfig
from sim.profiles import ModelProfile, Profiles

TEXTS = ("How do I reset my password?", "Where is my order 1042?", "What is the status of order 1007?",
         "Can I change the shipping address of my order?", "My invoice shows the wrong amount.",
         "How long does a refund take?", "Do you ship to Canada?", "I want to cancel my subscription.")
GENERATIVE = ("hf-causal-lm",)


def batch_sizes(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


@dataclass(frozen=True)
class Probe:
    """One request a model is measured with: the text it came from, its input
    tensors and its parameters."""

    text: str
    inputs: dict[str, np.ndarray]
    params: dict[str, Any]
    stream: bool = False          # the node streams (ModelStreamInfer), as the pipeline calls it


def measure_order(config: MeshConfig, models: list[str]) -> list[str]:
    """``models`` with every pipeline's upstream models before its downstream ones."""
    from router.pipelines.graph import PipelineGraph

    rank: dict[str, int] = {}
    for name, pipe in config.pipelines.items():
        graph = PipelineGraph.build(name, pipe)
        for node in graph.order:
            m = graph.node(node).model
            rank[m] = max(rank.get(m, 0), len(graph.ancestors[node]))
    return sorted(models, key=lambda m: (rank.get(m, 0), models.index(m)))


def _first_node(config: MeshConfig, model: str):
    """(pipeline name, graph, node name) of the first pipeline node calling ``model``, or None."""
    from router.pipelines.graph import PipelineGraph

    for name, pipe in config.pipelines.items():
        graph = PipelineGraph.build(name, pipe)
        for node in graph.order:
            if graph.node(node).model == model:
                return name, graph, node
    return None


def when_fields(config: MeshConfig, model: str) -> set[str]:
    """Output fields of ``model`` that some node's ``when`` reads (``intent.label``)."""
    fields: set[str] = set()
    for pipe in config.pipelines.values():
        mine = [n for n, cfg in pipe.nodes.items() if cfg.model == model]
        for cfg in pipe.nodes.values():
            for n in mine:
                fields.update(re.findall(rf"\b{re.escape(n)}\.(\w+)", cfg.when or ""))
    return fields


def probes(config: MeshConfig, model: str, manifest, texts: list[str],
           answers: dict[str, dict[str, Any]]) -> list[Probe]:
    """What ``model`` is sent for each text: its pipeline node's input and params
    on the request and the upstream answers (``answers``: model -> text ->
    outputs), or the text itself for a model no pipeline calls."""
    from cmesh.expr import evaluate, truthy
    from cmesh.pipeline_check import render_params
    from router.pipelines.calls import node_inputs
    from router.pipelines.graph import REQUEST

    found = _first_node(config, model)
    if found is None:
        first = manifest.inputs[0]
        if first.datatype != "BYTES":
            raise ValueError(f"{model}: input {first.name} is {first.datatype} and no pipeline calls it; "
                             f"declare its profile in YAML")
        return [Probe(t, {first.name: np.array([t.encode()], dtype=object)}, {}) for t in texts]
    pipeline, graph, node = found
    cfg = graph.node(node)
    out = []
    for t in texts:
        env: dict[str, Any] = {REQUEST: {"text": t}}
        for a in graph.ancestors[node]:
            upstream = graph.node(a).model
            if upstream not in answers:
                raise ValueError(f"{model}: its node {pipeline}.{node} needs {upstream}'s answers; "
                                 f"measure {upstream} in the same run")
            env[a] = answers[upstream].get(t)
        if node in graph.when and not truthy(evaluate(graph.when[node], env)):
            continue                                   # the pipeline does not call it for this text
        params = {k: v for k, v in render_params(cfg.params, env).items() if isinstance(v, (int, float, str, bool))}
        out.append(Probe(t, node_inputs(node, cfg, manifest, env, pipeline), params, stream=cfg.stream))
    if not out:
        raise ValueError(f"{model}: {pipeline}.{node}'s `when` holds for none of the texts; "
                         f"pass texts that reach it (--scenario)")
    return out


# The replicas measured here are ours alone: a fresh mesh-internal token for them
# (when the config asks for one), which every call below sends.
_TOKEN = secrets.token_urlsafe(32)


async def _start(provider, model: str, timeout_s: float) -> tuple[object, float]:
    """One replica of ``model`` through the provider, as the autoscaler starts
    one; returns its handle once ready and the seconds from asking to ready."""
    t0 = time.monotonic()
    await provider.scale(model, "serverless", 1, [])
    while time.monotonic() - t0 < timeout_s:
        ready = [r for r in provider.replicas() if r.model == model and r.state == "ready"]
        if ready:
            return ready[0], time.monotonic() - t0
        await asyncio.sleep(0.02)
    raise TimeoutError(f"{model}: no replica ready within {timeout_s:g} s")


async def _stop(provider, model: str, timeout_s: float = 60.0) -> None:
    await provider.scale(model, "serverless", 0, [])
    t0 = time.monotonic()
    while any(r.model == model for r in provider.replicas()) and time.monotonic() - t0 < timeout_s:
        await asyncio.sleep(0.02)


async def _measure_live(config: MeshConfig, config_path: Path, model: str, sent: list[Probe], sizes: list[int],
                        *, cold_starts: int, repeats: int, log) -> tuple[list[float], dict, dict]:
    """Cold starts, the batching curve and the answers, from replicas the local
    provider starts (its fork server included: the cold start the mesh gives)."""
    from autoscaler.providers.local import LocalProvider
    from cmesh.internal_auth import MeshCredentials

    with tempfile.TemporaryDirectory(prefix="cmesh-profile-") as state:
        provider = LocalProvider(config, str(config_path), state_dir=state, grace_s=0.0,
                                 credentials=MeshCredentials(None, _TOKEN))
        try:
            await provider.start()               # the fork server, as the autoscaler boots it
            colds = []
            for i in range(cold_starts):
                handle, cold = await _start(provider, model, config.autoscaler.ready_timeout_s)
                colds.append(round(cold, 4))
                log(f"{model}: cold start {i + 1}/{cold_starts}: {cold:.3f} s")
                if i + 1 < cold_starts:
                    await _stop(provider, model)
            curve, answers = await _drive(handle.address, model, sent, sizes, repeats, log)
        finally:
            await provider.close()
    return colds, curve, answers


def _request(model: str, probe: Probe):
    from cmesh.client import build_request

    return build_request(model, probe.inputs, parameters=probe.params)


async def _call(stub, model: str, probe: Probe):
    """One call as the pipeline makes it: unary, or streamed to its final response
    (a streamed answer pays for every piece it sends). Returns the answer (the
    streamed pieces joined, as the router's node call joins them)."""
    from cmesh.tensors import decode_outputs, output_texts
    from cmesh.wire import is_final

    request = _request(model, probe)
    if not probe.stream:
        return decode_outputs(await stub.ModelInfer(request, timeout=300))

    async def one():
        yield request

    pieces = []
    async for response in stub.ModelStreamInfer(one(), timeout=300):
        if response.error_message:
            raise RuntimeError(f"{model}: {response.error_message}")
        pieces += output_texts(response.infer_response)
        if is_final(response.infer_response):
            break
    return {"output": np.array(["".join(pieces).encode()], dtype=object)}


async def _batch_latency(stub, model: str, sent: list[Probe], b: int, repeats: int) -> float:
    samples = []
    for r in range(repeats):
        batch = [sent[(r * b + i) % len(sent)] for i in range(b)]
        t0 = time.perf_counter()
        await asyncio.gather(*(_call(stub, model, p) for p in batch))
        samples.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(samples)


async def _drive(address: str, model: str, sent: list[Probe], sizes: list[int], repeats: int,
                 log) -> tuple[dict[int, float], dict[str, dict[str, Any]]]:
    """The batching curve, and each text's answer (what downstream nodes get)."""
    from cmesh.internal_auth import MeshCredentials, open_internal_channel
    from protos import inference_pb2_grpc as pb_grpc
    from router.pipelines.values import from_outputs

    async with open_internal_channel(address, MeshCredentials(None, _TOKEN)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        answers = {}
        for probe in sent:                               # one each: warms it up, and what it answers
            answers[probe.text] = from_outputs(await _call(stub, model, probe))
        curve = {}
        for b in sizes:
            curve[b] = round(await _batch_latency(stub, model, sent, b, repeats), 3)
            log(f"{model}: batch {b}: {curve[b]:.1f} ms")
        return curve, answers


def _branches(fields: set[str], answers: dict[str, dict[str, Any]]) -> tuple[dict, dict]:
    """The ``when``-read fields: per text, and as a distribution over the texts."""
    by_text = {t: {f: str(out[f]) for f in sorted(fields) if f in out} for t, out in answers.items()}
    by_text = {t: v for t, v in by_text.items() if v}
    dist = {f: {v: n / len(by_text) for v, n in Counter(o[f] for o in by_text.values() if f in o).items()}
            for f in sorted(fields)} if by_text else {}
    return by_text, {f: d for f, d in dist.items() if d}


def measure_model(config: MeshConfig, config_path: Path, model: str, *, texts: list[str] | None = None,
                  answers: dict[str, dict[str, dict[str, Any]]] | None = None, cold_starts: int = 3,
                  repeats: int = 5, log=print) -> ModelProfile:
    """Measure one model; its answers per text go into ``answers[model]`` for the
    models downstream of it."""
    from cmesh.store import ModelStore

    answers = {} if answers is None else answers
    spec = config.models[model]
    source = next(iter(spec.variant_sources().values())).source
    manifest = ModelStore(config.store).open(source).manifest
    engine = spec.engine or manifest.engine
    max_batch = spec.batching.max_batch_size or getattr(manifest, "max_batch_size", None) or 16
    sent = probes(config, model, manifest, list(texts or TEXTS), answers)
    colds, curve, answers[model] = asyncio.run(_measure_live(
        config, config_path, model, sent, batch_sizes(max_batch), cold_starts=max(1, cold_starts),
        repeats=repeats, log=log))
    by_text, outputs = _branches(when_fields(config, model), answers[model])
    median = statistics.median(colds)
    sigma = float(np.std(np.log(colds))) if len(colds) > 1 and min(colds) > 0 else 0.1
    return ModelProfile(
        latency_ms=curve, batching="continuous" if engine in GENERATIVE else "dynamic",
        max_batch_size=max_batch, max_queue_delay_ms=spec.batching.max_queue_delay_ms or 0.0,
        cold_start_s=round(median, 4), cold_start_sigma=round(min(3.0, max(0.01, sigma)), 4),
        cpu_cores=float(spec.resources.torch_threads or 1), outputs=outputs, outputs_by_text=by_text,
        measured={"by": "cmesh profile", "machine": f"{os.cpu_count()} CPUs, {platform.machine()}",
                  "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cold_starts_s": colds,
                  "repeats": repeats, "texts": len(sent), "params": sent[0].params})


def scenario_texts(scenario, config: MeshConfig) -> dict[str, list[str]]:
    """Per model, the request texts of a replay scenario's classes that reach it."""
    from loadtest.scenario import DEFAULT_TEXTS

    out: dict[str, list[str]] = {}
    for c in scenario.classes:
        models = [n.model for n in config.pipelines[c.pipeline].nodes.values()] if c.pipeline else [c.model]
        for m in models:
            out.setdefault(m, [])
            out[m] += [t for t in (c.texts or DEFAULT_TEXTS) if t not in out[m]]
    return out


def measure(config: MeshConfig, config_path: Path, models: list[str], *, cold_starts: int = 3, repeats: int = 5,
            cores: float | None = None, texts: dict[str, list[str]] | None = None, log=print) -> Profiles:
    """Measure ``models`` in pipeline order (``texts``: per model, default the built-in set)."""
    out: dict[str, ModelProfile] = {}
    answers: dict[str, dict[str, dict[str, Any]]] = {}
    for m in measure_order(config, models):
        try:
            out[m] = measure_model(config, config_path, m, texts=(texts or {}).get(m), answers=answers,
                                   cold_starts=cold_starts, repeats=repeats, log=log)
        except Exception as exc:   # noqa: BLE001 - report and go on with the others
            log(f"{m}: not measured ({type(exc).__name__}: {exc}); declare its profile in the YAML")
    # Models it could not drive get a declared default (a few ms, the measured cold
    # starts' median), marked as such; edit it in the YAML if it matters.
    colds = [p.cold_start_s for p in out.values()] or [0.5]
    default = ModelProfile(latency_ms={1: 5.0, 16: 8.0}, max_batch_size=16, cold_start_s=statistics.median(colds),
                           measured={"by": "declared default: not measured"})
    return Profiles(name="measured", description=f"measured by cmesh profile on {platform.node()}",
                    host={"cores": cores if cores is not None else float(os.cpu_count() or 1),
                          "network_ms": 0.5},
                    default=default, models={m: out[m] for m in models if m in out})
