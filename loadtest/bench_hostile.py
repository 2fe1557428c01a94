"""``python -m loadtest.bench_hostile``: what hostile input costs everyone else.

A steady good load (intent-classifier texts and kb-index embeddings) goes
through a router process to a real model-server process, first alone (quiet),
then with the hostile mix of issue 11 beside it at a fixed rate: hostile shapes,
undecodable bytes (unary and on a stream), bad parameters, a 100 KB model name,
over-limit and large PII texts, SQL bombs through a pipeline, a direct call to an
internal model, and forged repository calls to the replica. Prints one JSON
object last: good P99 quiet and hostile and their ratio, RSS growth of the
router and the replica, the worst event-loop lag (from their histograms), and
how many hostile calls got UNKNOWN or INTERNAL, and how many processes died.
Traffic goes only to 127.0.0.1; both phases are bounded in time.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import struct
import subprocess
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np

from cmesh.proc import spawn_service
from loadtest.common import REPO, emit, percentile_ms, stop_all, write_temp_config

TOKEN_ENV = "CMESH_BENCH_INTERNAL_TOKEN"
DEMO_MODELS = ("intent-classifier", "kb-index", "sql-executor")
LAG_BUCKETS_FAMILY = "cmesh_event_loop_lag_seconds"
SEEN_BAD: list[str] = []      # the first UNKNOWN / INTERNAL answers, for the report


def build_store(demo: Path, root: Path) -> None:
    from cmesh.manifest import Manifest, dump_manifest

    root.mkdir(parents=True)
    for name in DEMO_MODELS:
        (root / name).symlink_to((demo / name).resolve())
    d = root / "echo" / "1"
    d.mkdir(parents=True)
    (d / "model.yaml").write_text(dump_manifest(Manifest(
        name="echo", version="1", engine="identity",
        inputs=[{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        outputs=[{"name": "echo", "datatype": "BYTES", "shape": [-1]}],
        batching={"max_batch_size": 8, "max_queue_delay_ms": 1})))


def mesh_yaml(store: Path, endpoint: str | None) -> dict:
    models = {"intent-classifier": {"source": "store://intent-classifier/1"},
              "kb-index": {"source": "store://kb-index/1"},
              "sql-executor": {"source": "store://sql-executor/1", "internal": True,
                               "trust": {"mask_outputs": True,
                                         "redact_fields": ["customer_name", "customer_email"]}},
              "echo": {"source": "store://echo/1"}}
    if endpoint:
        for cfg in models.values():
            cfg["endpoints"] = [endpoint]
    return {"store": str(store), "models": models,
            "security": {"internal_token_env": TOKEN_ENV},
            "server": {"max_message_bytes": 4 * 2**20, "limits": {"max_text_bytes": 2**20}},
            "pipelines": {"lookup": {"nodes": {"q": {"model": "sql-executor", "optional": False,
                                                     "input": {"query": "request.text",
                                                               "params": "default(request.params, '{}')"}}}}}}


# -- the hostile mix -------------------------------------------------------------------

def _tensor(model: str, name: str, datatype: str, shape: list[int], raw: bytes):
    from protos import inference_pb2 as pb

    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


def _text(model: str, text: bytes, **params):
    from cmesh.client import build_request

    return build_request(model, {"text": np.array([text], dtype=object)}, parameters=params)


def hostile_mix() -> list[tuple[str, str, object]]:
    """(kind, how it is sent, payload): 'infer' a request, 'raw' bytes to ModelInfer,
    'stream' requests or bytes on one ModelStreamInfer, 'run' a pipeline request,
    'unload' a repository call straight to the replica."""
    from protos import mesh_pb2

    shapes = [("BYTES", [2**27], b"\x05\x00\x00\x00hello"), ("BYTES", [2**30], b"\x00" * 16),
              ("FP32", [2**34], b"\x00" * 16), ("FP32", [2**62, 4], b"\x00" * 16),
              ("FP32", [2**32, 2**32], b"\x00" * 16), ("FP32", [1] * 65, b"\x00" * 4),
              ("FP32", [-1], b"\x00" * 4), ("FP32", [-2**63], b"\x00" * 4)]
    mix: list[tuple[str, str, object]] = []
    for datatype, shape, raw in shapes:
        mix.append(("shape", "infer", _tensor("intent-classifier", "text", datatype, shape, raw)))
        mix.append(("shape", "infer", _tensor("kb-index", "embedding", datatype, shape, raw)))
    good = _text("intent-classifier", b"where is my order?").SerializeToString()
    mix += [("undecodable", "raw", b"\xff\xff\xff\xff\x0a"),
            ("undecodable", "stream", [good, b"\x0a\xff\xff", good]),
            ("parameter", "infer", _text("intent-classifier", b"hi", **{"cmesh-timeout-ms": "abc"})),
            ("parameter", "infer", _text("intent-classifier", b"hi", **{"cmesh-timeout-ms": float("-inf")})),
            ("parameter", "infer", _text("intent-classifier", b"hi", **{"cmesh-timeout-ms": -5})),
            ("echo", "infer", _text("n" * 100_000, b"hi")),
            ("text", "infer", _text("echo", b"x" * (15 * 2**20 + 900_000))),     # over the message limit
            ("text", "infer", _text("echo", b"x" * (3 * 2**20 + 500_000))),      # over the text limit
            # Legitimate but large: masked by the trust layer's workers, off the loop.
            ("text", "infer", _text("echo", b"mail jane@example.com, call +44 20 7946 0958. " * 4_000)),
            ("internal", "infer", _tensor("sql-executor", "query", "BYTES", [1],
                                          struct.pack("<I", 22) + b"SELECT * FROM orders;")),
            ("sql", "run", mesh_pb2.RunRequest(pipeline="lookup", inputs={
                "text": "SELECT length(printf('%.*c',1000000000,'x'))"})),
            ("sql", "run", mesh_pb2.RunRequest(pipeline="lookup", inputs={
                "text": "SELECT 1 WHERE 1 = :a", "params": "[" * 100_000 + "]" * 100_000})),
            ("sql", "run", mesh_pb2.RunRequest(pipeline="lookup", inputs={"text": "SELECT 1\x00; DROP"})),
            ("forged", "unload", "intent-classifier")]
    return mix


async def send_hostile(kind: str, how: str, payload, router, replica) -> str:
    import grpc

    from protos import inference_pb2 as pb

    try:
        if how == "infer":
            await router["infer"](payload, timeout=10)
        elif how == "raw":
            await router["raw"](payload, timeout=10)
        elif how == "stream":
            async for answer in router["stream"](iter(payload), timeout=10):
                if answer.error_message and not answer.error_message.startswith("INVALID_ARGUMENT"):
                    return answer.error_message.partition(":")[0]
        elif how == "run":
            await router["run"](payload, timeout=10)
        elif how == "unload":
            await replica["unload"](pb.RepositoryModelUnloadRequest(model_name=payload), timeout=10)
        return "OK"
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
            SEEN_BAD.append(f"{kind}: {exc.code().name}: {exc.details()}"[:300])
        return exc.code().name


# -- load and measurement --------------------------------------------------------------

async def good_load(stubs, seconds: float, concurrency: int) -> tuple[list[float], int]:
    from cmesh.client import build_request

    texts = [b"where is my order 1042?", b"how do I reset my password?", b"I want a refund"]
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((16, 384)).astype(np.float32)
    latencies: list[float] = []
    failed = 0
    end = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal failed
        i = w
        while time.perf_counter() < end:
            if i % 2:
                request = build_request("intent-classifier", {"text": np.array([texts[i % 3]], dtype=object)})
            else:
                request = build_request("kb-index", {"embedding": vectors[i % 16:i % 16 + 1]})
            start = time.perf_counter()
            try:
                await stubs["infer"](request, timeout=10)
                latencies.append(time.perf_counter() - start)
            except Exception:  # noqa: BLE001 - counted, and the phase goes on
                failed += 1
            i += concurrency

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return latencies, failed


async def hostile_load(stubs, replica, seconds: float, rate: float, kinds: set[str] | None = None) -> Counter:
    mix = [m for m in hostile_mix() if kinds is None or m[0] in kinds]
    outcomes: Counter = Counter()
    end = time.perf_counter() + seconds
    tasks = []
    i = 0
    while time.perf_counter() < end:
        kind, how, payload = mix[i % len(mix)]
        task = asyncio.create_task(send_hostile(kind, how, payload, stubs, replica))
        task.add_done_callback(lambda t, k=kind: outcomes.update([f"{k}:{t.result()}"]))
        tasks.append(task)
        i += 1
        await asyncio.sleep(1.0 / rate)
    await asyncio.gather(*tasks)
    return outcomes


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def lag_buckets(metrics_port: int) -> dict[float, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name == LAG_BUCKETS_FAMILY:
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    out[float(s.labels["le"])] = s.value
    return out


def max_lag_ms(before: dict[float, float], after: dict[float, float]) -> float:
    """The smallest bucket bound that holds every lag observed between two scrapes:
    an upper bound on the worst lag of the phase."""
    total = after[float("inf")] - before.get(float("inf"), 0.0)
    for bound in sorted(b for b in after if b != float("inf")):
        if after[bound] - before.get(bound, 0.0) >= total:
            return bound * 1000.0
    return float("inf")


def start(args: list[str], env: dict) -> tuple[subprocess.Popen, dict]:
    return spawn_service([*args, "--port", "0", "--metrics-port", "0", "--log-level", "ERROR"],
                         stderr=subprocess.DEVNULL, cwd=REPO, env=env)


async def run(demo: Path, seconds: float, rate: float, concurrency: int, kinds: set[str] | None = None) -> dict:
    import grpc

    from protos import inference_pb2 as pb
    from protos import inference_pb2_grpc as pb_grpc
    from protos import mesh_pb2_grpc

    root = Path(tempfile.mkdtemp(prefix="cmesh-hostile-"))
    build_store(demo, root / "store")
    env = {**os.environ, TOKEN_ENV: secrets.token_urlsafe(24), "OMP_NUM_THREADS": "1"}
    procs: list[subprocess.Popen] = []
    try:
        backend = write_temp_config(mesh_yaml(root / "store", None))
        replica, ready = start(["-m", "model_server", "--config", str(backend),
                                "--models", ",".join([*DEMO_MODELS, "echo"])], env)
        procs.append(replica)
        replica_addr, replica_metrics = f"127.0.0.1:{ready['port']}", ready["metrics_port"]
        front = write_temp_config(mesh_yaml(root / "store", replica_addr))
        router, ready = start(["-m", "router", "--config", str(front)], env)
        procs.append(router)
        router_addr, router_metrics = f"127.0.0.1:{ready['port']}", ready["metrics_port"]
        options = [("grpc.max_send_message_length", 64 * 2**20), ("grpc.max_receive_message_length", 64 * 2**20)]
        async with grpc.aio.insecure_channel(router_addr, options=options) as channel, \
                grpc.aio.insecure_channel(replica_addr) as direct:
            oip = pb_grpc.GRPCInferenceServiceStub(channel)
            stubs = {"infer": oip.ModelInfer, "raw": channel.unary_unary(
                         "/inference.GRPCInferenceService/ModelInfer"),
                     "stream": channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                                     response_deserializer=pb.ModelStreamInferResponse.FromString),
                     "run": mesh_pb2_grpc.PipelinesStub(channel).Run}
            replica_stubs = {"unload": pb_grpc.GRPCInferenceServiceStub(direct).RepositoryModelUnload}
            # The forged repository calls carry no mesh token, as an attacker's would not.
            await good_load(stubs, 3.0, concurrency)                     # warm-up
            rss_before = {p.pid: rss_mb(p.pid) for p in procs}
            lags0 = [lag_buckets(router_metrics), lag_buckets(replica_metrics)]
            quiet, quiet_failed = await good_load(stubs, seconds, concurrency)
            lags1 = [lag_buckets(router_metrics), lag_buckets(replica_metrics)]
            (hostile, hostile_failed), outcomes = await asyncio.gather(
                good_load(stubs, seconds, concurrency), hostile_load(stubs, replica_stubs, seconds, rate, kinds))
            lags2 = [lag_buckets(router_metrics), lag_buckets(replica_metrics)]
            rss_after = {p.pid: rss_mb(p.pid) for p in procs}
        crashes = sum(1 for p in procs if p.poll() is not None)
        codes = Counter()
        for key, n in outcomes.items():
            codes[key.partition(":")[2]] += n
        p99_quiet, p99_hostile = percentile_ms(quiet, 99), percentile_ms(hostile, 99)
        return {"good_p99_ms_quiet": round(p99_quiet, 3), "good_p99_ms_hostile": round(p99_hostile, 3),
                "good_p99_ratio": round(p99_hostile / p99_quiet, 3),
                "good_p50_ms_quiet": round(percentile_ms(quiet, 50), 3),
                "good_p50_ms_hostile": round(percentile_ms(hostile, 50), 3),
                "good_requests": [len(quiet), len(hostile)], "good_failed": quiet_failed + hostile_failed,
                "hostile_sent": sum(outcomes.values()), "hostile_codes": dict(codes),
                "hostile_outcomes": dict(sorted(outcomes.items())),
                "rss_growth_mb": round(sum(max(0.0, rss_after[pid] - rss_before[pid]) for pid in rss_before), 1),
                "max_loop_lag_ms": max(max_lag_ms(a, b) for a, b in zip(lags1, lags2)),
                "max_loop_lag_ms_router": max_lag_ms(lags1[0], lags2[0]),
                "max_loop_lag_ms_replica": max_lag_ms(lags1[1], lags2[1]),
                "max_loop_lag_ms_quiet": max(max_lag_ms(a, b) for a, b in zip(lags0, lags1)),
                "unknown": codes.get("UNKNOWN", 0), "internal": codes.get("INTERNAL", 0), "crashes": crashes}
    finally:
        stop_all(procs, log=lambda line: None, timeout_s=30)
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_hostile", description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default=str(REPO / ".cmesh" / "store"),
                   help="the demo store (`cmesh models bootstrap` builds it)")
    p.add_argument("--seconds", type=float, default=12.0, help="length of each phase")
    p.add_argument("--rate", type=float, default=20.0, help="hostile messages per second")
    p.add_argument("--concurrency", type=int, default=4, help="good-load workers")
    p.add_argument("--kinds", default=None, help="comma-separated subset of the hostile kinds (default: all)")
    args = p.parse_args(argv)
    kinds = set(args.kinds.split(",")) if args.kinds else None
    result = asyncio.run(run(Path(args.store), args.seconds, args.rate, args.concurrency, kinds))
    print(json.dumps(result["hostile_outcomes"], indent=1))
    for line in SEEN_BAD[:10]:
        print("bad answer:", line)
    emit({k: v for k, v in result.items() if k != "hostile_outcomes"})
    ok = (result["good_p99_ratio"] <= 1.5 and result["rss_growth_mb"] <= 100 and result["max_loop_lag_ms"] <= 50
          and not (result["unknown"] or result["internal"] or result["crashes"]))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
