"""Live changes under steady load: a version switch, a mode switch and an A/B
weight change, each applied through the router's Admin service while unary
calls and pipeline runs keep flowing.

    python -m loadtest.bench_rollout [--per-change 2000] [--workers 12]

The mesh runs as processes (autoscaler with its local provider, router); the
load comes from this process on loopback, half ModelInfer on ``m``, half
Pipelines.Run of ``p`` (m, then the A/B model ``w``). Each change waits until
the new state answers everywhere (every answer of ``m`` from version 2; every
answer of ``w`` from variant b) and at least ``--per-change`` requests were sent
during it. Prints one JSON object last:

* ``switch_s``: the version switch, from the apply to 100 % of traffic on the new
  version (the first moment after which no answer came from the old one);
* ``failed``: requests that failed during the three changes (target 0);
* ``p99_ratio``: p99 during the version switch over p99 before it (target <= 1.5);
* per change: requests, failed, p50/p99 and how long it took.
"""
from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from loadtest.common import emit, free_port, percentile_ms, running_mesh


def echo_versions(store: Path) -> tuple[str, str]:
    """Two versions of a text echo model (identity engine): only the version differs."""
    from cmesh.manifest import Manifest, dump_manifest

    sources = []
    for version in ("1", "2"):
        d = store / "echo" / version
        d.mkdir(parents=True, exist_ok=True)
        manifest = Manifest(name="echo", version=version, engine="identity",
                            inputs=[{"name": "text", "datatype": "BYTES", "shape": [-1]}],
                            outputs=[{"name": "echo", "datatype": "BYTES", "shape": [-1]}],
                            batching={"max_batch_size": 8, "max_queue_delay_ms": 1})
        (d / "model.yaml").write_text(dump_manifest(manifest))
        sources.append(f"store://echo/{version}")
    return sources[0], sources[1]


def bench_config(store: Path, autoscaler_port: int) -> dict:
    v1, v2 = echo_versions(store)
    deployment = {"mode": "serverless", "min_replicas": 1, "max_replicas": 2, "target_concurrency": 16,
                  "idle_timeout_s": 600}
    return {"store": str(store),
            "server": {"drain_delay_s": 0.3, "drain_grace_s": 10},
            "autoscaler": {"tick_s": 0.25, "stable_window_s": 10, "panic_window_s": 2,
                           "listen": f"127.0.0.1:{autoscaler_port}"},
            "router": {"autoscaler": f"127.0.0.1:{autoscaler_port}", "hold_timeout_s": 60},
            "models": {"m": {"source": v1, "deployment": dict(deployment)},
                       "w": {"variants": {"a": {"source": v1, "weight": 100}, "b": {"source": v2, "weight": 0}},
                             "deployment": dict(deployment)}},
            "pipelines": {"p": {"nodes": {"first": {"model": "m", "input": "request.text"},
                                          "second": {"model": "w", "input": "request.text",
                                                     "after": ["first"]}}}}}


@dataclass
class Sample:
    at: float                       # monotonic, when the answer (or error) came
    latency_s: float
    ok: bool
    kind: str                       # "unary" or "pipeline"
    source: str = ""                # unary: the store version that answered (cmesh-source)
    error: str = ""


@dataclass
class Load:
    address: str
    workers: int
    samples: list[Sample] = field(default_factory=list)
    w_variants: list[tuple[float, str]] = field(default_factory=list)   # (at, variant) of w's answers
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        import grpc

        from cmesh.client import AsyncClient
        from protos import mesh_pb2, mesh_pb2_grpc

        client = AsyncClient(self.address)
        channel = grpc.aio.insecure_channel(self.address)
        pipelines = mesh_pb2_grpc.PipelinesStub(channel)
        text = {"text": np.array([b"hello"], dtype=object)}

        async def worker(i: int) -> None:
            n = 0
            while not self._stop.is_set():
                n += 1
                started = time.monotonic()
                try:
                    if (i + n) % 2:
                        answer = await client.infer("m", text, timeout=30)
                        self.samples.append(Sample(time.monotonic(), time.monotonic() - started, True, "unary",
                                                   source=str(answer.parameters.get("cmesh-source", ""))))
                    else:
                        run = await pipelines.Run(mesh_pb2.RunRequest(pipeline="p", inputs={"text": "hello"}),
                                                  timeout=30)
                        now = time.monotonic()
                        ok = not run.degraded
                        self.samples.append(Sample(now, now - started, ok, "pipeline",
                                                   error="" if ok else "degraded"))
                        for node in run.trace.nodes:
                            if node.model == "w":
                                self.w_variants.append((now, node.variant))
                except grpc.aio.AioRpcError as exc:
                    self.samples.append(Sample(time.monotonic(), time.monotonic() - started, False,
                                               "unary" if (i + n) % 2 else "pipeline",
                                               error=f"{exc.code().name}: {exc.details()}"))
        try:
            await asyncio.gather(*(worker(i) for i in range(self.workers)))
        finally:
            await client.close()
            await channel.close()

    def stop(self) -> None:
        self._stop.set()

    def since(self, t: float) -> list[Sample]:
        return [s for s in self.samples if s.at >= t]


async def apply(address: str, data: dict):
    import grpc

    from protos import mesh_pb2, mesh_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        resp = await mesh_pb2_grpc.AdminStub(channel).ApplyConfig(
            mesh_pb2.ApplyConfigRequest(yaml=yaml.safe_dump(data)), timeout=60)
    if not resp.applied:
        raise RuntimeError(f"the change was not applied: {resp}")
    return resp


async def change(load: Load, address: str, data: dict, done, per_change: int, timeout_s: float = 120) -> dict:
    """Apply ``data``; wait until ``done(t0)`` holds and ``per_change`` requests were
    answered since the apply. The change's figures."""
    t0 = time.monotonic()
    await apply(address, data)
    deadline = t0 + timeout_s
    while time.monotonic() < deadline:
        if len(load.since(t0)) >= per_change and done(t0):
            break
        await asyncio.sleep(0.1)
    else:
        raise RuntimeError("the change did not complete in time")
    during = load.since(t0)
    lat = [s.latency_s for s in during]
    return {"requests": len(during), "failed": sum(not s.ok for s in during),
            "errors": sorted({s.error for s in during if s.error})[:5], "took_s": round(time.monotonic() - t0, 2),
            "p50_ms": round(percentile_ms(lat, 50), 2), "p99_ms": round(percentile_ms(lat, 99), 2), "t0": t0}


def last_old(load: Load, t0: float, old: str) -> float | None:
    """When the last unary answer from the old version came (None: none since t0)."""
    times = [s.at for s in load.since(t0) if s.kind == "unary" and s.source == old]
    return max(times) if times else None


async def bench(per_change: int, workers: int, warm_s: float) -> dict:
    import tempfile

    store = Path(tempfile.mkdtemp(prefix="cmesh-rollout-store-"))
    port = free_port()
    data = bench_config(store, port)
    v1, v2 = data["models"]["m"]["source"], data["models"]["w"]["variants"]["b"]["source"]
    with running_mesh(data) as (router, _autoscaler):
        load = Load(router, workers)
        task = asyncio.create_task(load.run())
        try:
            await asyncio.sleep(warm_s)                     # replicas up, queues steady
            before_t = time.monotonic()
            await asyncio.sleep(max(3.0, per_change / 800))
            before = load.since(before_t)
            # 1. Version switch of m (v1 -> v2).
            data["models"]["m"]["source"] = v2
            version = await change(load, router, data, lambda t0: (
                any(s.source == v2 for s in load.since(t0))
                and all(s.source == v2 for s in load.since(t0) if s.kind == "unary" and s.at > time.monotonic() - 1)),
                per_change)
            gone = last_old(load, version["t0"], v1)
            version["switch_s"] = round((gone - version["t0"]) if gone else 0.0, 3)
            # 2. Mode switch of m (serverless -> dedicated, the replicas re-pooled).
            data["models"]["m"]["deployment"] = {"mode": "dedicated", "dedicated_replicas": 1, "max_replicas": 2}
            mode = await change(load, router, data, lambda t0: True, per_change)
            # 3. A/B weight change of w (a 100 -> b 100).
            data["models"]["w"]["variants"]["a"]["weight"] = 0
            data["models"]["w"]["variants"]["b"]["weight"] = 100
            weights = await change(load, router, data, lambda t0: any(
                at > t0 and v == "b" for at, v in load.w_variants) and all(
                v == "b" for at, v in load.w_variants if at > time.monotonic() - 1), per_change)
        finally:
            load.stop()
            await task
    p99_before = percentile_ms([s.latency_s for s in before], 99)
    changes = {"version": version, "mode": mode, "weights": weights}
    for c in changes.values():
        c.pop("t0")
    return {"switch_s": version["switch_s"], "failed": sum(c["failed"] for c in changes.values()),
            "p99_ratio": round(version["p99_ms"] / p99_before, 3) if p99_before else None,
            "p99_before_ms": round(p99_before, 2), "requests_before": len(before), "workers": workers,
            "changes": changes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_rollout", description=__doc__.split("\n\n")[0])
    p.add_argument("--per-change", type=int, default=2000, help="requests at least during each change")
    p.add_argument("--workers", type=int, default=12, help="concurrent callers")
    p.add_argument("--warm-s", type=float, default=4.0, help="load before the measured baseline starts")
    args = p.parse_args(argv)
    emit(asyncio.run(bench(args.per_change, args.workers, args.warm_s)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
