"""``cmesh profile MODEL``: measure a model's profile on this machine, from real replicas.

For each model: start a real replica (``python -m model_server``, the model as
``mesh.yaml`` configures it, batching included) ``--cold-starts`` times and
keep each replica's own cold-start measurement (process start → ready); then,
on one replica, send ``b`` concurrent single-row requests for each batch size
``b`` (1, 2, 4, ... up to the model's ``max_batch_size``; the replica's batcher
groups them) ``--repeats`` times and keep the median of the slowest answer:
the latency of one batch of ``b``. Generative models get the ``params`` their
first pipeline node sends (``max_tokens``), and the batching kind
``continuous``. Models whose first input is not text (the vector index: an
embedding) get the embedder's output for the same texts.

Writes the profiles as YAML (``sim.profiles``), with ``measured:`` saying
how, where and when. A model the command cannot drive (the SQL tool's query
and params tensors) is reported and left out: declare it in the YAML.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import platform
import statistics
import subprocess
import time
from pathlib import Path

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


def _params(config: MeshConfig, model: str) -> dict:
    for pipe in config.pipelines.values():
        for node in pipe.nodes.values():
            if node.model == model and node.params:
                return {k: v for k, v in node.params.items() if isinstance(v, (int, float)) and k == "max_tokens"}
    return {}


# The replicas measured here are ours alone: a fresh mesh-internal token for them
# (when the config asks for one), which every call below sends.
_TOKEN = secrets.token_urlsafe(32)


def _spawn(config_path: Path, model: str, token_env: str | None = None):
    from cmesh.proc import spawn_service

    env = dict(os.environ)
    if token_env:
        env[token_env] = _TOKEN
    proc, ready = spawn_service(["-m", "model_server", "--config", str(config_path), "--models", model,
                                 "--port", "0", "--log-level", "WARNING"], stderr=subprocess.DEVNULL,
                                env=env)
    return proc, ready


def _stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def _batch_latency(address: str, model: str, inputs: list[dict], params: dict, b: int,
                         repeats: int) -> float:
    from cmesh.client import build_request
    from protos import inference_pb2_grpc as pb_grpc

    from cmesh.internal_auth import MeshCredentials, open_internal_channel

    async with open_internal_channel(address, MeshCredentials(None, _TOKEN)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await stub.ModelInfer(build_request(model, inputs[0], parameters=params), timeout=120)   # warm
        samples = []
        for r in range(repeats):
            reqs = [build_request(model, inputs[(r * b + i) % len(inputs)], parameters=params) for i in range(b)]
            t0 = time.perf_counter()
            await asyncio.gather(*(stub.ModelInfer(q, timeout=300) for q in reqs))
            samples.append((time.perf_counter() - t0) * 1000.0)
        return statistics.median(samples)


async def _embeddings(address: str) -> list[np.ndarray]:
    from cmesh.client import AsyncClient

    from cmesh.internal_auth import HEADER

    client = AsyncClient(address, metadata=[(HEADER, _TOKEN)])
    try:
        out = []
        for t in TEXTS:
            res = await client.infer("embedder", {"text": np.array([t.encode()], dtype=object)}, timeout=60)
            out.append(next(iter(res.outputs.values())))
        return out
    finally:
        await client.close()


def measure_model(config: MeshConfig, config_path: Path, model: str, *, cold_starts: int = 3, repeats: int = 5,
                  log=print) -> ModelProfile:
    from cmesh.store import ModelStore
    from protos import inference_pb2 as pb

    spec = config.models[model]
    source = next(iter(spec.variant_sources().values())).source
    manifest = ModelStore(config.store).open(source).manifest
    engine = spec.engine or manifest.engine
    max_batch = spec.batching.max_batch_size or getattr(manifest, "max_batch_size", None) or 16
    colds = []
    for i in range(cold_starts):
        t0 = time.monotonic()
        proc, ready = _spawn(config_path, model, config.security.internal_token_env)
        colds.append(float(ready.get("cold_start_s") or (time.monotonic() - t0)))
        log(f"{model}: cold start {i + 1}/{cold_starts}: {colds[-1]:.3f} s")
        if i + 1 < cold_starts:
            _stop(proc)
    try:
        address = f"127.0.0.1:{ready['port']}"
        first = manifest.inputs[0]
        if first.datatype == "BYTES":
            inputs = [{first.name: np.array([t.encode()], dtype=object)} for t in TEXTS]
        elif "embedder" in config.models:
            eproc, eready = _spawn(config_path, "embedder", config.security.internal_token_env)
            try:
                vecs = asyncio.run(_embeddings(f"127.0.0.1:{eready['port']}"))
            finally:
                _stop(eproc)
            inputs = [{first.name: np.asarray(v, dtype=np.float32).reshape(1, -1)} for v in vecs]
        else:
            raise ValueError(f"{model}: input {first.name} is {first.datatype}; declare its profile in YAML")
        params = _params(config, model)
        curve = {}
        for b in batch_sizes(max_batch):
            curve[b] = round(asyncio.run(_batch_latency(address, model, inputs, params, b, repeats)), 3)
            log(f"{model}: batch {b}: {curve[b]:.1f} ms")
    finally:
        _stop(proc)
    median = statistics.median(colds)
    sigma = float(np.std(np.log(colds))) if len(colds) > 1 and min(colds) > 0 else 0.1
    del pb
    return ModelProfile(
        latency_ms=curve, batching="continuous" if engine in GENERATIVE else "dynamic",
        max_batch_size=max_batch, max_queue_delay_ms=spec.batching.max_queue_delay_ms or 0.0,
        cold_start_s=round(median, 4), cold_start_sigma=round(min(3.0, max(0.01, sigma)), 4),
        cpu_cores=float(spec.resources.torch_threads or 1),
        measured={"by": "cmesh profile", "machine": f"{os.cpu_count()} CPUs, {platform.machine()}",
                  "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cold_starts_s": colds,
                  "repeats": repeats, "params": params})


def measure(config: MeshConfig, config_path: Path, models: list[str], *, cold_starts: int = 3, repeats: int = 5,
            cores: float | None = None, log=print) -> Profiles:
    out = {}
    for m in models:
        try:
            out[m] = measure_model(config, config_path, m, cold_starts=cold_starts, repeats=repeats, log=log)
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
                    default=default, models=out)
