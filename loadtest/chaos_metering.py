"""Metering through a Redis outage: every request the router answers must be metered, once.

    python -m loadtest.chaos_metering [--requests 6000] [--outage-s 10] [--concurrency 32] [--rate R]

Starts, all on 127.0.0.1: its own redis-server on a free port (append-only file,
fsync on every write, so a restart keeps every acknowledged write), an identity
model server, and a router metering to that Redis. Sends ``--requests`` calls,
each with a unique ``cmesh-request-id``, paced at ``--rate`` (default: spread over
three outage lengths), with at most ``--concurrency`` in flight. A third of the
way through the sending window it SIGKILLs redis-server, restarts it on the same
port ``--outage-s`` later, waits (bounded) for the router's metering spool to
drain, stops the router cleanly and counts what Redis holds.

Prints one JSON object last: sent, ok, errors, metered (requests in Redis rows),
metered_ok (of which status OK), duplicates (request ids stored more than once),
missing_ids (OK request ids absent from the store), spooled, replayed, dropped
(the router's cmesh_metering_* counters), max_spool_depth, answered_during_outage,
drain_s (Redis restart -> spool empty), metering_failed_logs, and
lost = ok - metered_ok. Exits 1 when anything was lost or counted twice.
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cmesh.proc import spawn_service
from loadtest.common import REPO, ServerProc, emit, free_port, write_temp_config

MODEL = "identity"
REQUEST_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 60.0


class RedisProcess:
    """A redis-server on 127.0.0.1 that can be SIGKILLed and restarted on the same
    port. Its append-only file is fsynced on every write, so the restarted server
    holds everything the killed one acknowledged."""

    def __init__(self, directory: Path, *, port: int | None = None, start: bool = True) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        if start:
            self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 20.0) -> None:
        import redis

        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--save", "", "--appendonly", "yes", "--appendfsync", "always"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError):   # LOADING is a ConnectionError
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"redis-server did not start on port {self.port}")
                time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last save; the kernel closes its sockets."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def identity_store(root: Path) -> None:
    from cmesh.manifest import Manifest, dump_manifest

    d = root / MODEL / "1"
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.yaml").write_text(dump_manifest(Manifest(
        name=MODEL, version="1", engine="identity",
        inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
        outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, 16]}],
        batching={"max_batch_size": 32, "max_queue_delay_ms": 1})))


class RouterProc:
    """``python -m router`` metering to ``redis_url``, its log in ``log_path``."""

    def __init__(self, config: Path, redis_url: str, log_path: Path) -> None:
        self._log = open(log_path, "w")
        self.log_path = log_path
        self.proc, ready = spawn_service(
            ["-m", "router", "--config", str(config), "--port", "0", "--metrics-port", "0",
             "--redis", redis_url, "--log-level", "WARNING"], stderr=self._log, cwd=REPO)
        self.address = f"127.0.0.1:{ready['port']}"
        self.metrics_port = ready["metrics_port"]

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("cmesh_metering_"):
                    out[sample.name] = sample.value
        return out

    def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@dataclass
class Tally:
    sent: int = 0
    ok_ids: list[str] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    answered_during_outage: int = 0
    killed_at: float | None = None
    restarted_at: float | None = None
    drained_at: float | None = None
    max_depth: float = 0.0
    last_metrics: dict[str, float] = field(default_factory=dict)


async def drive(router: RouterProc, redis_server: RedisProcess, *, requests: int, outage_s: float,
                concurrency: int, rate: float, log) -> Tally:
    import grpc

    from cmesh.client import build_request
    from protos import inference_pb2_grpc as pb_grpc

    tally = Tally()
    run = uuid.uuid4().hex[:8]
    x = np.ones((1, 16), dtype=np.float32)
    window = requests / rate
    gate = asyncio.Semaphore(concurrency)
    start = time.monotonic()

    def in_outage(t: float) -> bool:
        return tally.killed_at is not None and t >= tally.killed_at and (
            tally.restarted_at is None or t <= tally.restarted_at)

    async def chaos() -> None:
        await asyncio.sleep(window / 3)
        redis_server.kill()
        tally.killed_at = time.monotonic()
        log(f"redis-server SIGKILLed after {tally.sent} requests sent; restarting in {outage_s:g} s")
        await asyncio.sleep(outage_s)
        await asyncio.to_thread(redis_server.start)
        tally.restarted_at = time.monotonic()
        log(f"redis-server restarted on port {redis_server.port} after {tally.sent} requests sent")

    async def watch() -> None:
        while True:
            try:
                tally.last_metrics = await asyncio.to_thread(router.metrics)
            except OSError:
                pass
            depth = tally.last_metrics.get("cmesh_metering_spool_depth", 0.0)
            tally.max_depth = max(tally.max_depth, depth)
            if tally.restarted_at is not None and tally.drained_at is None and depth == 0:
                tally.drained_at = time.monotonic()
            await asyncio.sleep(0.2)

    async with grpc.aio.insecure_channel(router.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def one(i: int) -> None:
            request_id = f"chaos-{run}-{i}"
            request = build_request(MODEL, {"x": x}, parameters={"cmesh-request-id": request_id})
            try:
                await stub.ModelInfer(request, timeout=REQUEST_TIMEOUT_S)
                tally.ok_ids.append(request_id)
                if in_outage(time.monotonic()):
                    tally.answered_during_outage += 1
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
                tally.errors[code] = tally.errors.get(code, 0) + 1
            finally:
                gate.release()

        chaos_task = asyncio.create_task(chaos())
        watch_task = asyncio.create_task(watch())
        tasks = []
        try:
            for i in range(requests):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await gate.acquire()
                tally.sent += 1
                tasks.append(asyncio.create_task(one(i)))
                if (i + 1) % max(1, requests // 10) == 0:
                    log(f"sent {i + 1}/{requests}")
            await asyncio.wait_for(asyncio.gather(*tasks), REQUEST_TIMEOUT_S + 10)
            await asyncio.wait_for(chaos_task, outage_s + 30)
            # The spool drains on its own; wait for it, bounded.
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            while tally.drained_at is None and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.5)             # the router's last events leave its queue
            tally.last_metrics = await asyncio.to_thread(router.metrics)
        finally:
            for task in (chaos_task, watch_task, *tasks):
                task.cancel()
            await asyncio.gather(chaos_task, watch_task, *tasks, return_exceptions=True)
    return tally


async def read_store(url: str) -> tuple[int, int, list[str]]:
    """(metered requests, of which OK, every stored request id in stream order)."""
    from router.metering import RedisMeter

    meter = RedisMeter(url)
    try:
        rows = await meter.rows()
        ids: list[str] = []
        since = None
        while True:
            page = await meter.events(since_id=since, count=5000)
            if not page:
                break
            ids += [stored.event.request_id for stored in page]
            since = page[-1].id
    finally:
        await meter.close()
    return (sum(r.requests for r in rows), sum(r.requests for r in rows if r.status == "OK"), ids)


def measure(*, requests: int = 6000, outage_s: float = 10.0, concurrency: int = 32,
            rate: float | None = None, log=print) -> dict:
    """Run the whole experiment (processes included) and return the result object."""
    import uvloop

    if not 1 <= requests <= 1_000_000:
        raise ValueError("requests: must be in 1..1000000")
    if not 0 < outage_s <= 300:
        raise ValueError("outage_s: must be in (0, 300]")
    if not 1 <= concurrency <= 1024:
        raise ValueError("concurrency: must be in 1..1024")
    rate = rate or requests / (3 * outage_s)
    if rate <= 0:
        raise ValueError("rate: must be > 0")
    with tempfile.TemporaryDirectory(prefix="cmesh-chaos-metering-") as tmp:
        root = Path(tmp)
        identity_store(root / "store")
        redis_server = RedisProcess(root / "redis")
        backend = router = None
        configs: list[Path] = []
        try:
            configs.append(write_temp_config({"store": str(root / "store"), "models": {MODEL: {
                "source": f"store://{MODEL}/1", "batching": {"max_queue_size": 4096}}}}))
            backend = ServerProc(configs[-1], [MODEL])
            configs.append(write_temp_config({"store": str(root / "store"), "models": {MODEL: {
                "source": f"store://{MODEL}/1", "endpoints": [backend.address],
                "deployment": {"max_inflight_per_replica": 64}}}}))
            router = RouterProc(configs[-1], redis_server.url, root / "router.log")
            log(f"router {router.address}, model server {backend.address}, redis {redis_server.url}; "
                f"{requests} requests at {rate:.0f}/s, a {outage_s:g} s Redis outage")
            tally = uvloop.run(drive(router, redis_server, requests=requests, outage_s=outage_s,
                                     concurrency=concurrency, rate=rate, log=log))
            router.stop()                       # a clean stop: the spool's last flush
            log_text = router.log_path.read_text(errors="replace")
            router = None
            metered, metered_ok, stored_ids = uvloop.run(read_store(redis_server.url))
        finally:
            if router is not None:
                router.stop()
            if backend is not None:
                backend.stop()
            redis_server.stop()
            for path in configs:
                path.unlink(missing_ok=True)
    m = tally.last_metrics
    ok = len(tally.ok_ids)
    stored = set(stored_ids)
    return {
        "sent": tally.sent, "ok": ok, "errors": sum(tally.errors.values()), "error_codes": tally.errors,
        "metered": metered, "metered_ok": metered_ok,
        "duplicates": len(stored_ids) - len(stored),
        "missing_ids": sum(1 for rid in tally.ok_ids if rid not in stored),
        "spooled": int(m.get("cmesh_metering_spooled_total", 0)),
        "replayed": int(m.get("cmesh_metering_replayed_total", 0)),
        "dropped": int(m.get("cmesh_metering_dropped_total", 0)),
        "max_spool_depth": int(tally.max_depth),
        "answered_during_outage": tally.answered_during_outage,
        "outage_s": round(tally.restarted_at - tally.killed_at, 2)
        if tally.killed_at and tally.restarted_at else None,
        "drain_s": round(tally.drained_at - tally.restarted_at, 2)
        if tally.drained_at and tally.restarted_at else None,
        "metering_failed_logs": log_text.count("metering failed"),
        "lost": ok - metered_ok,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.chaos_metering",
                                description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=6000, help="requests to send (default 6000)")
    p.add_argument("--outage-s", type=float, default=10.0, help="seconds Redis stays killed (default 10)")
    p.add_argument("--concurrency", type=int, default=32, help="most requests in flight (default 32)")
    p.add_argument("--rate", type=float, default=None,
                   help="requests per second (default: requests spread over 3 x outage-s)")
    args = p.parse_args(argv)
    result = measure(requests=args.requests, outage_s=args.outage_s, concurrency=args.concurrency,
                     rate=args.rate, log=lambda line: print(line, flush=True))
    emit(result)
    return 0 if result["lost"] == 0 and result["duplicates"] == 0 and result["missing_ids"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
