"""Fan-out overhead of the pipeline executor: three parallel sleep nodes (20, 50
and 100 ms) vs the slowest of them alone, and a sequential variant.

    python -m loadtest.bench_fanout [--runs 200]

A model server hosts the three sleep models; a router serves the pipelines. The
slowest node is measured alone through the same router (ModelInfer), so the
difference is what the DAG executor adds. Prints one JSON object last:
slowest_node_ms, pipeline_p50_ms, fanout_overhead_ms_p50, fanout_overhead_ms_p99
(pipeline minus slowest node), sequential_p50_ms.
"""
from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from cmesh.manifest import Manifest, dump_manifest
from cmesh.proc import spawn_service
from loadtest.common import REPO, ServerProc, emit, write_temp_config

SLEEPS = {"sleep20": 20, "sleep50": 50, "sleep100": 100}
VECTOR = "[1.0, 2.0, 3.0, 4.0]"


def build_store(root: Path) -> None:
    for name, ms in SLEEPS.items():
        d = root / name / "1"
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.yaml").write_text(dump_manifest(Manifest(
            name=name, version="1", engine="sleep", options={"sleep_ms": ms},
            inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
            outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
            batching={"max_batch_size": 8, "max_queue_delay_ms": 0})))


def config(store: Path, backend: str | None) -> dict:
    models = {name: {"source": f"store://{name}/1", **({"endpoints": [backend]} if backend else {})}
              for name in SLEEPS}
    nodes_parallel = {name: {"model": name, "input": VECTOR} for name in SLEEPS}
    nodes_sequential = {"a": {"model": "sleep20", "input": VECTOR},
                        "b": {"model": "sleep50", "input": VECTOR, "after": ["a"]},
                        "c": {"model": "sleep100", "input": VECTOR, "after": ["b"]}}
    return {"store": str(store), "models": models,
            "pipelines": {"fanout": {"nodes": nodes_parallel, "output": "sleep100"},
                          "sequential": {"nodes": nodes_sequential, "output": "c"}}}


def measure(address: str, runs: int) -> dict[str, list[float]]:
    import grpc

    from cmesh.client import build_request
    from protos import inference_pb2_grpc, mesh_pb2, mesh_pb2_grpc

    results: dict[str, list[float]] = {"node": [], "fanout": [], "sequential": []}
    with grpc.insecure_channel(address) as channel:
        pipelines = mesh_pb2_grpc.PipelinesStub(channel)
        oip = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        node_request = build_request("sleep100", {"x": np.ones((1, 4), dtype=np.float32)})
        for name in ("fanout", "sequential"):                      # warm every path once
            pipelines.Run(mesh_pb2.RunRequest(pipeline=name, inputs={"text": "go"}), timeout=30)
        for _ in range(runs):                                       # interleaved: drift hits all alike
            t0 = time.monotonic()
            oip.ModelInfer(node_request, timeout=30)
            t1 = time.monotonic()
            pipelines.Run(mesh_pb2.RunRequest(pipeline="fanout", inputs={"text": "go"}), timeout=30)
            t2 = time.monotonic()
            pipelines.Run(mesh_pb2.RunRequest(pipeline="sequential", inputs={"text": "go"}), timeout=30)
            t3 = time.monotonic()
            results["node"].append((t1 - t0) * 1000)
            results["fanout"].append((t2 - t1) * 1000)
            results["sequential"].append((t3 - t2) * 1000)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_fanout", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=200)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cmesh-bench-fanout-") as tmp:
        store = Path(tmp)
        build_store(store)
        backend_cfg = write_temp_config(config(store, None))
        backend = ServerProc(backend_cfg, list(SLEEPS))
        router_cfg = write_temp_config(config(store, backend.address))
        router, ready = spawn_service(["-m", "router", "--config", str(router_cfg), "--port", "0",
                                       "--log-level", "WARNING"], stderr=subprocess.DEVNULL, cwd=REPO)
        try:
            r = measure(f"127.0.0.1:{ready['port']}", args.runs)
        finally:
            router.terminate()
            router.wait(timeout=30)
            backend.stop()
            backend_cfg.unlink()
            router_cfg.unlink()
    node, fan, seq = (np.array(r[k]) for k in ("node", "fanout", "sequential"))
    overhead = fan - node                       # paired per round
    emit({"slowest_node_ms": round(float(np.median(node)), 3), "pipeline_p50_ms": round(float(np.median(fan)), 3),
          "fanout_overhead_ms_p50": round(float(np.percentile(overhead, 50)), 3),
          "fanout_overhead_ms_p99": round(float(np.percentile(overhead, 99)), 3),
          "sequential_p50_ms": round(float(np.median(seq)), 3), "runs": args.runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
