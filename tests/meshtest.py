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
    server = ModelServer(config, ServerOptions(models=models, port=0, **options))
    await server.start()
    try:
        yield server
    finally:
        await server.drain()
