"""Dynamic batching on the MiniLM embedder: engine alone vs served, batching on vs off.

    python -m loadtest.bench_batching [--seconds 8] [--concurrency 128] [--device cuda]

Prints one JSON object last: offline_max_batch_rps (engine alone, largest batch,
same process, tokenization included), served_rps (through gRPC with dynamic
batching), nobatch_rps (through gRPC, max_batch_size 1), served_over_offline,
batching_gain, p50_ms, p99_ms (of the served run).
"""
from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import numpy as np

from loadtest.common import ServerProc, emit, percentile_ms, write_temp_config

SENTENCES = [
    "How do I reset my password if I no longer have access to my email?",
    "Where is my order 1042 and when will it arrive?",
    "I was charged twice for the same subscription this month.",
    "Can I change the shipping address after the order has shipped?",
    "What is your return policy for damaged items?",
    "The app crashes every time I open the settings page.",
    "Do you ship internationally to Canada and Mexico?",
    "Please cancel my order, I bought the wrong size.",
]


def texts(n: int) -> list[str]:
    return [f"{SENTENCES[i % len(SENTENCES)]} (ticket {i})" for i in range(n)]


def offline_rps(store: Path, max_batch: int, seconds: float, device: str = "cpu") -> float:
    from cmesh.store import ModelStore
    from model_server.engines.base import EngineContext
    from model_server.engines.hf_encoder import HFEncoderEngine

    version = ModelStore(str(store)).open("store://minilm-l6/1")
    engine = HFEncoderEngine(EngineContext(model="embedder", variant="default", model_dir=version.local_dir,
                                           manifest=version.manifest, options=version.manifest.options,
                                           max_batch_size=max_batch, device=device))
    engine.load()
    engine.warmup()
    batch = np.array([t.encode() for t in texts(max_batch)], dtype=object)
    rows, started = 0, time.monotonic()
    while time.monotonic() - started < seconds:
        engine.run_batch([engine.prepare({"text": batch}, {})])
        rows += max_batch
    return rows / (time.monotonic() - started)


async def drive(address: str, concurrency: int, seconds: float, warmup: float) -> tuple[float, list[float]]:
    """Closed loop: `concurrency` workers, one text per request, for `seconds`."""
    import grpc

    from cmesh.client import build_request
    from protos import inference_pb2_grpc as pb_grpc

    requests = [build_request("embedder", {"text": np.array([t.encode()], dtype=object)})
                for t in texts(256)]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        latencies: list[float] = []
        counted = 0
        start = time.monotonic()
        measure_from, stop_at = start + warmup, start + warmup + seconds

        async def worker(k: int) -> None:
            nonlocal counted
            i = k
            while (now := time.monotonic()) < stop_at:
                await stub.ModelInfer(requests[i % len(requests)], timeout=30)
                done = time.monotonic()
                if now >= measure_from:
                    latencies.append(done - now)
                    counted += 1
                i += concurrency

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        return counted / seconds, latencies


def served(store: Path, max_batch: int, delay_ms: float, concurrency: int, seconds: float,
           device: str = "cpu") -> tuple[float, list[float]]:
    config = write_temp_config({"store": str(store), "models": {"embedder": {
        "source": "store://minilm-l6/1",
        "batching": {"max_batch_size": max_batch, "max_queue_delay_ms": delay_ms,
                     "max_queue_size": 4 * concurrency},
        "resources": {"device": device}}}})
    server = ServerProc(config, ["embedder"])
    try:
        import uvloop

        return uvloop.run(drive(server.address, concurrency, seconds, warmup=2.0))
    finally:
        server.stop()
        config.unlink()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_batching", description=__doc__.splitlines()[0])
    p.add_argument("--store", default=".cmesh/store", help="model store (bootstrapped if needed)")
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per run")
    p.add_argument("--concurrency", type=int, default=128, help="requests in flight")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--delay-ms", type=float, default=4.0)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N, for every run")
    args = p.parse_args(argv)

    from demo_store import bootstrap

    store = Path(args.store)
    bootstrap(store, progress=lambda line: print(line, flush=True), only=["minilm-l6/1"])
    offline = offline_rps(store, args.max_batch, args.seconds, args.device)
    print(f"offline engine, batch {args.max_batch}: {offline:.0f} texts/s", flush=True)
    served_rps, lat = served(store, args.max_batch, args.delay_ms, args.concurrency, args.seconds, args.device)
    print(f"served with dynamic batching: {served_rps:.0f} req/s, p50 {percentile_ms(lat, 50):.1f} ms, "
          f"p99 {percentile_ms(lat, 99):.1f} ms", flush=True)
    nobatch_rps, _ = served(store, 1, 0.0, args.concurrency, args.seconds, args.device)
    print(f"served with max_batch_size 1: {nobatch_rps:.0f} req/s", flush=True)
    emit({"offline_max_batch_rps": round(offline, 1), "served_rps": round(served_rps, 1),
          "nobatch_rps": round(nobatch_rps, 1),
          "served_over_offline": round(served_rps / offline, 3),
          "batching_gain": round(served_rps / nobatch_rps, 3),
          "p50_ms": round(percentile_ms(lat, 50), 2), "p99_ms": round(percentile_ms(lat, 99), 2),
          "concurrency": args.concurrency, "max_batch_size": args.max_batch, "device": args.device})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
