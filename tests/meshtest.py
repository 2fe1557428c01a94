"""Helpers for tests: synthetic model stores and in-process servers on free ports."""
from __future__ import annotations

import socket
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from cmesh.config import MeshConfig, parse_config
from cmesh.manifest import Manifest, dump_manifest
from model_server.server import ModelServer, ServerOptions

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_version(store: Path, name: str, version: str, *, engine: str,
                  inputs: list[dict], outputs: list[dict], options: dict | None = None,
                  max_batch_size: int = 8, max_queue_delay_ms: float = 2.0) -> str:
    """Write a model.yaml-only version (for engines that need no files)."""
    d = store / name / version
    d.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(name=name, version=version, engine=engine, inputs=inputs, outputs=outputs,
                        batching={"max_batch_size": max_batch_size,
                                  "max_queue_delay_ms": max_queue_delay_ms},
                        options=options or {})
    (d / "model.yaml").write_text(dump_manifest(manifest))
    return f"store://{name}/{version}"


def sleep_model(store: Path, name: str = "sleepy", *, sleep_ms: float = 20, per_row_ms: float = 0,
                max_batch_size: int = 8, max_queue_delay_ms: float = 2.0,
                engine: str = "sleep") -> str:
    """A model taking x: FP32[-1, 4] and returning y = x, after sleeping per batch."""
    return write_version(store, name, "1", engine=engine,
                         inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
                         outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
                         options={"sleep_ms": sleep_ms, "per_row_ms": per_row_ms},
                         max_batch_size=max_batch_size, max_queue_delay_ms=max_queue_delay_ms)


def mesh_config(store: Path, models: dict[str, dict[str, Any]], **extra: Any) -> MeshConfig:
    return parse_config({"store": str(store), "models": models, **extra})


@asynccontextmanager
async def running_server(config: MeshConfig, models: list[str], **options: Any):
    options.setdefault("drain_delay_s", 0.0)
    server = ModelServer(config, ServerOptions(models=models, port=0, **options))
    await server.start()
    try:
        yield server
    finally:
        await server.drain()


class ServerProcess:
    """`python -m model_server` as a child process; knows its ports once ready."""

    def __init__(self, config_path: Path, models: list[str], *extra: str, timeout: float = 180) -> None:
        import json
        import subprocess
        import sys
        import time

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "model_server", "--config", str(config_path),
             "--models", ",".join(models), "--port", "0", "--metrics-port", "0", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        deadline = time.monotonic() + timeout
        self.ready: dict = {}
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"model server exited early:\n{self.proc.stderr.read()[-4000:]}")
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == "ready":
                    self.ready = event
                    break
        else:
            self.proc.kill()
            raise RuntimeError("model server did not become ready in time")
        self.port = self.ready["port"]
        self.metrics_port = self.ready["metrics_port"]
        self.address = f"127.0.0.1:{self.port}"

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(self.metrics()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        raise KeyError(f"{name} {labels} not exported")

    def stop(self, timeout: float = 60) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.stdout.close()
            self.proc.stderr.close()


def write_config(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


def identity_text_model(store: Path, name: str = "echo", version: str = "1", *,
                        max_batch_size: int = 8) -> str:
    """A model echoing its BYTES input: lets a test see exactly what a replica received."""
    return write_version(store, name, version, engine="identity",
                         inputs=[{"name": "text", "datatype": "BYTES", "shape": [-1]}],
                         outputs=[{"name": "echo", "datatype": "BYTES", "shape": [-1]}],
                         max_batch_size=max_batch_size, max_queue_delay_ms=1)


@asynccontextmanager
async def running_router(config: MeshConfig, **kw: Any):
    """An in-process router on a free port (static endpoints unless the config names
    an autoscaler). Keyword arguments go to RouterServer (meter, auth, metrics)."""
    from router.server import RouterOptions, RouterServer

    server = RouterServer(config, RouterOptions(port=0), **kw)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=1.0)


class IdleProvider:
    """An autoscaler provider with no replicas that starts none: for a Controller
    whose RPCs are tested, not its scaling."""

    def replicas(self):
        return []

    async def scale(self, model, pool, desired, devices):
        return None

    def subscribe(self, callback):
        return None

    async def close(self):
        return None


def in_flight_address(core, model: str) -> str | None:
    """The address of a replica now serving a request of the model, if any (the
    router core's dispatcher counts what it has in flight per replica)."""
    dispatcher = core.dispatchers.get(model)
    busy = {rid for rid, n in (dispatcher.in_flight.items() if dispatcher else ()) if n}
    return next((r.address for r in core.table.replicas(model) if r.id in busy), None)
