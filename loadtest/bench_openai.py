"""The OpenAI front door's cost: embeddings through the router's HTTP API against
the same embeddings through its gRPC API, in the same run.

    python -m loadtest.bench_openai [--seconds 4] [--rounds 3] [--store .cmesh/store]

One model server with the demo ``embedder`` (all-MiniLM-L6-v2, from the store the
bootstrap builds), one router serving both front doors. Each round measures, in
turn, concurrency 1 (latency) and 32 (throughput) over HTTP (``POST
/v1/embeddings``, one text, keep-alive connections, as an OpenAI client sends it)
and over gRPC (``ModelInfer``, the same text). Prints one JSON object last:
grpc_p50_ms, http_p50_ms, http_added_p50_ms (HTTP minus gRPC), grpc_rps, http_rps,
http_rps_ratio, and the rounds.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

from cmesh.proc import spawn_service
from loadtest.common import REPO, ServerProc, emit, percentile_ms, write_temp_config

TEXT = "Where is my order 1042? It was supposed to arrive yesterday."


async def drive_grpc(address: str, concurrency: int, seconds: float, warmup: float) -> tuple[float, list[float]]:
    import grpc

    from cmesh.client import build_request
    from protos import inference_pb2_grpc as pb_grpc

    request = build_request("embedder", {"text": np.array([TEXT.encode()], dtype=object)})
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        return await _drive(lambda: stub.ModelInfer(request, timeout=30), concurrency, seconds, warmup)


async def drive_http(base: str, concurrency: int, seconds: float, warmup: float) -> tuple[float, list[float]]:
    import aiohttp

    body = json.dumps({"model": "embedder", "input": TEXT, "encoding_format": "float"})
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers={"Content-Type": "application/json"}) as session:
        async def one() -> None:
            async with session.post(f"{base}/v1/embeddings", data=body) as response:
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
                await response.read()

        return await _drive(one, concurrency, seconds, warmup)


async def _drive(call, concurrency: int, seconds: float, warmup: float) -> tuple[float, list[float]]:
    latencies: list[float] = []
    start = time.monotonic()
    measure_from, stop_at = start + warmup, start + warmup + seconds

    async def worker() -> None:
        while (t0 := time.monotonic()) < stop_at:
            await call()
            if t0 >= measure_from:
                latencies.append(time.monotonic() - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(latencies) / seconds, latencies


def measure(drive, target: str, seconds: float) -> dict:
    import uvloop

    _, lat1 = uvloop.run(drive(target, 1, seconds, 1.0))
    rps, _ = uvloop.run(drive(target, 32, seconds, 1.0))
    return {"p50_ms": percentile_ms(lat1, 50), "rps": rps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_openai", description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=4.0, help="measured seconds per run")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (gRPC, HTTP); medians are reported")
    p.add_argument("--store", default=str(REPO / ".cmesh" / "store"), help="the demo store (make bootstrap)")
    args = p.parse_args(argv)
    store = Path(args.store)
    if not (store / "minilm-l6" / "1" / "model.yaml").exists():
        raise SystemExit(f"no embedder in {store}: run `make bootstrap` (or pass --store)")
    embedder = {"source": "store://minilm-l6/1", "engine": "hf-encoder",
                "batching": {"max_batch_size": 64, "max_queue_delay_ms": 2, "max_queue_size": 4096}}
    backend_cfg = write_temp_config({"store": str(store), "models": {"embedder": embedder}})
    router_cfg = None
    backend = ServerProc(backend_cfg, ["embedder"])
    router = None
    try:
        router_cfg = write_temp_config({"store": str(store), "models": {"embedder": {
            **embedder, "endpoints": [backend.address], "deployment": {"max_inflight_per_replica": 64}}}})
        router, ready = spawn_service(["-m", "router", "--config", str(router_cfg), "--port", "0", "--http-port", "0",
                                       "--log-level", "WARNING"], stderr=subprocess.DEVNULL, cwd=REPO)
        grpc_address, http_base = f"127.0.0.1:{ready['port']}", f"http://127.0.0.1:{ready['http_port']}"
        runs: dict[str, list[dict]] = {"grpc": [], "http": []}
        for i in range(args.rounds):
            for name, drive, target in (("grpc", drive_grpc, grpc_address), ("http", drive_http, http_base)):
                runs[name].append(measure(drive, target, args.seconds))
                r = runs[name][-1]
                print(f"round {i + 1} {name}: p50 {r['p50_ms']:.3f} ms, {r['rps']:.0f} req/s", flush=True)
    finally:
        if router is not None:
            router.terminate()
            router.wait(timeout=30)
        backend.stop()
        for cfg in (backend_cfg, router_cfg):
            if cfg is not None:
                cfg.unlink()
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    g, h = med["grpc"], med["http"]
    emit({"grpc_p50_ms": round(g["p50_ms"], 3), "http_p50_ms": round(h["p50_ms"], 3),
          "http_added_p50_ms": round(h["p50_ms"] - g["p50_ms"], 3),
          "grpc_rps": round(g["rps"], 1), "http_rps": round(h["rps"], 1),
          "http_rps_ratio": round(h["rps"] / g["rps"], 3), "rounds": args.rounds})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
