"""Time to the first complete support-agent answer from zero replicas: independent
per-model warming vs coordinated pre-warming.

    python -m loadtest.bench_coldstart

Every model of the support-agent pipeline starts at zero (the demo config, with
every pool serverless and min 0), and one Pipelines.Run of support-agent goes
through the router (intent and embedder in parallel, then kb-index, the
optional orders lookup, and the dialogue LLM). Run 1 warms each model only when
a node first touches it; run 2 lets the first touch warm the whole pipeline in
parallel. Prints one JSON object last: independent_s,
coordinated_s, ratio, the per-model load (cold start) times of each run, and
the best ratio coordination could reach on these numbers (``ratio_bound``).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml

from loadtest.common import REPO, emit, mesh_token, running_mesh

QUESTION = "How do I reset my password?"


def bench_config(store: Path, coordinated: bool, autoscaler_port: int) -> dict:
    data = yaml.safe_load((REPO / "compose" / "mesh.yaml").read_text())
    data["store"] = str(store)
    data.pop("tenants", None)                       # the benchmark measures scaling, not auth
    data.pop("schedules", None)
    data.setdefault("security", {}).pop("admin_keys_env", None)
    data["autoscaler"] = {"tick_s": 0.5, "coordinated_prewarm": coordinated, "listen": f"127.0.0.1:{autoscaler_port}"}
    data["router"] = {"autoscaler": f"127.0.0.1:{autoscaler_port}", "hold_timeout_s": 300}
    for spec in data["models"].values():
        spec["deployment"] = {"mode": "serverless", "min_replicas": 0, "max_replicas": 2,
                              "target_concurrency": 8, "idle_timeout_s": 600}
    return data


async def first_answer(address: str) -> float:
    """Time to the first complete support-agent answer (Pipelines.Run) from zero."""
    import grpc

    from protos import mesh_pb2, mesh_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        started = time.monotonic()
        await mesh_pb2_grpc.PipelinesStub(channel).Run(
            mesh_pb2.RunRequest(pipeline="support-agent", inputs={"text": QUESTION}), timeout=300)
        return time.monotonic() - started


async def load_times(autoscaler: str, internal_token: str | None = None) -> dict[str, float]:
    from cmesh.internal_auth import MeshCredentials, open_internal_channel
    from protos import mesh_pb2, mesh_pb2_grpc

    async with open_internal_channel(autoscaler, MeshCredentials(token=internal_token)) as channel:
        status = await mesh_pb2_grpc.AutoscalerStub(channel).Status(mesh_pb2.StatusRequest(), timeout=10)
    return {m.model: round(m.last_cold_start_s, 3) for m in status.models if m.last_cold_start_s}


def measure(store: Path, coordinated: bool, port: int, fork_server: bool = True) -> tuple[float, dict[str, float]]:
    import uvloop

    config = bench_config(store, coordinated, port)
    token = mesh_token(config)
    with running_mesh(config, autoscaler_args=() if fork_server else ("--no-fork-server",),
                      internal_token=token) as (router, autoscaler):
        elapsed = uvloop.run(first_answer(router))
        times = uvloop.run(load_times(autoscaler, token))
    return elapsed, times


def ratio_bound(independent: float, load_times: dict[str, float]) -> dict[str, float]:
    """How far coordination can go on this run's own numbers: the independent run
    waited ``serial_starts_s`` for cold starts along the pipeline's longest path;
    at best, starting every model at once waits only for the longest one
    (``longest_start_s``), with no contention between the starts. So the ratio can
    be no lower than ``best_ratio``, whatever the warming order."""
    from autoscaler.prewarm import serial_cold_start_s
    from cmesh.config import load_config

    config = load_config(REPO / "compose" / "mesh.yaml")
    serial = serial_cold_start_s(config, "support-agent", load_times)
    longest = max(load_times.values(), default=0.0)
    return {"serial_starts_s": round(serial, 3), "longest_start_s": round(longest, 3),
            "best_ratio": round((independent - serial + longest) / independent, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_coldstart", description=__doc__.splitlines()[0])
    p.add_argument("--store", default=".cmesh/store", help="demo model store (bootstrapped if needed)")
    p.add_argument("--port", type=int, default=8591, help="autoscaler port for the runs")
    p.add_argument("--no-fork-server", action="store_true",
                   help="replicas start as fresh processes (no pre-imported fork server)")
    args = p.parse_args(argv)
    from demo_store import bootstrap

    store = Path(args.store).resolve()
    bootstrap(store, progress=lambda line: print(line, flush=True))
    fork = not args.no_fork_server
    independent, ind_times = measure(store, coordinated=False, port=args.port, fork_server=fork)
    print(f"independent warming: first answer after {independent:.2f}s; load times {ind_times}", flush=True)
    coordinated, co_times = measure(store, coordinated=True, port=args.port, fork_server=fork)
    print(f"coordinated pre-warming: first answer after {coordinated:.2f}s; load times {co_times}", flush=True)
    emit({"independent_s": round(independent, 3), "coordinated_s": round(coordinated, 3),
          "ratio": round(coordinated / independent, 3), **ratio_bound(independent, ind_times),
          "load_times_independent_s": ind_times, "load_times_coordinated_s": co_times,
          "fork_server": fork, "driver": "Pipelines.Run support-agent"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
