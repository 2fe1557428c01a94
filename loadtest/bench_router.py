"""Router overhead on an identity engine: direct to the replica vs through the router.

    python -m loadtest.bench_router [--seconds 5]

Both data paths (a multiplexed bidi stream per replica, and one unary call per
request) are measured, interleaved with the direct runs over several rounds;
medians are reported and `path` names the faster at concurrency 32, which is the
router's default. A third router reaches the same model server as an ``oip``
backend (``backend: {kind: oip}``: any OIP server, unary ModelInfer, no mesh
parameters on the wire). Prints one JSON object last: direct_p50_ms, router_p50_ms,
added_p50_ms, added_p99_ms (concurrency 1), direct_rps, router_rps, rps_ratio
(concurrency 32), path, the other path's figures, and oip_added_p50_ms,
oip_rps_ratio.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from cmesh.proc import spawn_service
from loadtest.common import REPO, ServerProc, emit, percentile_ms, write_temp_config


def identity_store(root: Path) -> None:
    from cmesh.manifest import Manifest, dump_manifest

    d = root / "identity" / "1"
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.yaml").write_text(dump_manifest(Manifest(
        name="identity", version="1", engine="identity",
        inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
        outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, 16]}],
        batching={"max_batch_size": 32, "max_queue_delay_ms": 0})))


class RouterProc:
    def __init__(self, config: Path) -> None:
        self.proc, ready = spawn_service(["-m", "router", "--config", str(config), "--port", "0",
                                          "--log-level", "WARNING"], stderr=subprocess.DEVNULL, cwd=REPO)
        self.address = f"127.0.0.1:{ready['port']}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


async def drive(address: str, concurrency: int, seconds: float, warmup: float = 1.0) -> tuple[float, list[float]]:
    import grpc

    from cmesh.client import build_request
    from protos import inference_pb2_grpc as pb_grpc

    request = build_request("identity", {"x": np.ones((1, 16), dtype=np.float32)})
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        latencies: list[float] = []
        start = time.monotonic()
        measure_from, stop_at = start + warmup, start + warmup + seconds

        async def worker() -> None:
            while (t0 := time.monotonic()) < stop_at:
                await stub.ModelInfer(request, timeout=30)
                if t0 >= measure_from:
                    latencies.append(time.monotonic() - t0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(latencies) / seconds, latencies


def measure(address: str, seconds: float) -> dict:
    import uvloop

    _, lat1 = uvloop.run(drive(address, 1, seconds))
    rps, _ = uvloop.run(drive(address, 32, seconds))
    return {"p50_ms": percentile_ms(lat1, 50), "p99_ms": percentile_ms(lat1, 99), "rps": rps}


def median_of(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_router", description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=4.0, help="measured seconds per run")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds (direct, stream, unary); medians are reported")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cmesh-bench-router-") as tmp:
        store = Path(tmp)
        identity_store(store)
        backend_cfg = write_temp_config({"store": str(store), "models": {"identity": {
            "source": "store://identity/1", "batching": {"max_queue_size": 4096}}}})
        backend = ServerProc(backend_cfg, ["identity"])
        routers, configs = {}, []
        try:
            for path in ("stream", "unary"):
                cfg = write_temp_config({"store": str(store), "router": {"data_path": path}, "models": {
                    "identity": {"source": "store://identity/1", "endpoints": [backend.address],
                                 "deployment": {"max_inflight_per_replica": 64}}}})
                configs.append(cfg)
                routers[path] = RouterProc(cfg)
            # The same model server as an external OIP server, in front of it on the unary path.
            cfg = write_temp_config({"store": str(store), "models": {"identity": {
                "backend": {"kind": "oip", "endpoints": [backend.address], "max_inflight_per_endpoint": 64}}}})
            configs.append(cfg)
            routers["oip"] = RouterProc(cfg)
            # Interleaved rounds, so drift in the machine's speed hits every target alike.
            runs: dict[str, list[dict]] = {"direct": [], "stream": [], "unary": [], "oip": []}
            for i in range(args.rounds):
                for name, address in (("direct", backend.address), ("stream", routers["stream"].address),
                                      ("unary", routers["unary"].address), ("oip", routers["oip"].address)):
                    runs[name].append(measure(address, args.seconds))
                    r = runs[name][-1]
                    print(f"round {i + 1} {name}: p50 {r['p50_ms']:.3f} ms, {r['rps']:.0f} req/s", flush=True)
        finally:
            for router in routers.values():
                router.stop()
            backend.stop()
            for cfg in configs + [backend_cfg]:
                cfg.unlink()
    direct = median_of(runs["direct"])
    paths = {name: median_of(runs[name]) for name in ("stream", "unary")}
    oip = median_of(runs["oip"])
    best = max(paths, key=lambda k: paths[k]["rps"])
    other = "unary" if best == "stream" else "stream"
    r = paths[best]
    emit({"direct_p50_ms": round(direct["p50_ms"], 3), "router_p50_ms": round(r["p50_ms"], 3),
          "added_p50_ms": round(r["p50_ms"] - direct["p50_ms"], 3),
          "added_p99_ms": round(r["p99_ms"] - direct["p99_ms"], 3),
          "direct_rps": round(direct["rps"], 1), "router_rps": round(r["rps"], 1),
          "rps_ratio": round(r["rps"] / direct["rps"], 3), "path": best,
          f"{other}_added_p50_ms": round(paths[other]["p50_ms"] - direct["p50_ms"], 3),
          f"{other}_rps_ratio": round(paths[other]["rps"] / direct["rps"], 3),
          "oip_added_p50_ms": round(oip["p50_ms"] - direct["p50_ms"], 3),
          "oip_rps_ratio": round(oip["rps"] / direct["rps"], 3), "rounds": args.rounds})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
