"""Shared benchmark plumbing: model-server and mesh processes, latency stats, JSON output."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import yaml

from cmesh.proc import spawn_service

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A free loopback port (benchmarks send traffic only to 127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def mesh_token(config: dict) -> str | None:
    """A fresh mesh-internal token for a mesh started from ``config``, when its
    ``security.internal_token_env`` asks for one (pass it to ``running_mesh`` and to
    whatever calls the autoscaler: ``cmesh.internal_auth.MeshCredentials``)."""
    return secrets.token_urlsafe(32) if (config.get("security") or {}).get("internal_token_env") else None


@contextmanager
def running_mesh(config: dict, *, autoscaler_args: tuple[str, ...] = (), log=print,
                 internal_token: str | None = None, pids: list[int] | None = None):
    """Autoscaler + router on loopback, from ``config`` (a mesh.yaml as a dict whose
    ``autoscaler.listen`` is set), with their own replica state dir. Yields
    (router address, autoscaler address); on exit stops the router, then the
    autoscaler, which drains and stops its replicas. ``internal_token`` goes to
    every process in the variable ``security.internal_token_env`` names;
    ``pids`` (a list) gets the autoscaler's and the router's process ids."""
    path = write_temp_config(config)
    state = Path(tempfile.mkdtemp(prefix="cmesh-mesh-"))
    env = {**os.environ, "CMESH_STATE_DIR": str(state)}
    token_env = (config.get("security") or {}).get("internal_token_env")
    if token_env and internal_token:
        env[token_env] = internal_token
    procs: list[subprocess.Popen] = []
    try:
        for args in (["-m", "autoscaler", "--config", str(path), *autoscaler_args],
                     ["-m", "router", "--config", str(path), "--port", "0"]):
            proc, ready = spawn_service([*args, "--log-level", "WARNING"], stderr=subprocess.DEVNULL,
                                        cwd=REPO, env=env)
            procs.append(proc)
            if pids is not None:
                pids.append(proc.pid)
        yield f"127.0.0.1:{ready['port']}", config["autoscaler"]["listen"]
    finally:
        stop_all(procs, log)
        path.unlink(missing_ok=True)
        shutil.rmtree(state, ignore_errors=True)


def cpu_seconds(pids: list[int]) -> float | None:
    """User + system CPU seconds the processes have used so far (their own, not
    their children's: an autoscaler's replicas are not counted); None where
    ``/proc`` is not there to read (not Linux) or a process is gone."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        fields = stat[stat.rindex(")") + 2:].split()      # after "pid (comm) "
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15)
    return total


def busy_seconds() -> float | None:
    """Core-seconds this machine has spent busy (every process: all of /proc/stat's
    first line but idle and iowait); None where there is no /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields[:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def stop_all(procs: list[subprocess.Popen], log=print, timeout_s: float = 60) -> None:
    """SIGTERM each process, last started first; SIGKILL what outlives ``timeout_s``."""
    for proc in reversed(procs):
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log(f"pid {proc.pid} did not stop in {timeout_s:g} s: killed")
            proc.kill()
            proc.wait()


def emit(result: dict) -> None:
    """Every benchmark ends with exactly one JSON object on its last line."""
    print(json.dumps(result), flush=True)
