"""Shared benchmark plumbing: model-server processes, latency stats, JSON output."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import yaml

from cmesh.proc import spawn_service

REPO = Path(__file__).resolve().parent.parent


def percentile_ms(latencies_s: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(latencies_s) * 1000.0, q)) if latencies_s else float("nan")


def write_temp_config(data: dict) -> Path:
    fd, path = tempfile.mkstemp(prefix="cmesh-bench-", suffix=".yaml")
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(data, fh)
    return Path(path)


class ServerProc:
    """A `python -m model_server` child; ready once it prints its ready line."""


    def __init__(self, config: Path, models: list[str], env: dict | None = None) -> None:
        self.proc, self.ready = spawn_service(
            ["-m", "model_server", "--config", str(config), "--models", ",".join(models), "--port", "0",
             "--log-level", "WARNING"], stderr=subprocess.DEVNULL, cwd=REPO, env={**os.environ, **(env or {})})
        self.address = f"127.0.0.1:{self.ready['port']}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def emit(result: dict) -> None:
    """Every benchmark ends with exactly one JSON object on its last line."""
    print(json.dumps(result), flush=True)
