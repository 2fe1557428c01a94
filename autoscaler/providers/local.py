"""The embedded default provider: replicas are `python -m model_server` processes.

A replica starts on a free port and announces readiness (and its measured cold
start) on a JSON line; scale-down drains it: out of the endpoint table first, so
routers stop sending, then SIGTERM (the model server reports NOT_SERVING and
finishes in-flight work), then SIGKILL after the grace period.

Replicas outlive a crashed autoscaler - serving must not depend on it - so each
runs in its own session and is recorded in a state file; an autoscaler that
starts (a restart, or a standby taking over) adopts the live ones it finds there.
A clean shutdown (``close``) drains and stops every replica: nothing is orphaned.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from autoscaler.generations import generation
from autoscaler.providers.base import LIVE, ReplicaHandle
from cmesh.config import MeshConfig
from cmesh.internal_auth import MeshCredentials, open_internal_channel

log = logging.getLogger(__name__)

ROUTER_NOTICE_S = 0.3     # a draining replica leaves the table this long before SIGTERM


class LocalProvider:
    def __init__(self, config: MeshConfig, config_path: str, *, state_dir: str | Path = ".cmesh/autoscaler",
                 host: str = "127.0.0.1", advertise_host: str | None = None, grace_s: float | None = None,
                 extra_env: dict[str, str] | None = None, zygote: bool = True,
                 credentials: MeshCredentials | None = None) -> None:
        self.config = config
        self.config_path = str(config_path)
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "logs").mkdir(exist_ok=True)
        self.host = host
        self.advertise_host = advertise_host or host
        self.grace_s = config.autoscaler.drain_grace_s if grace_s is None else grace_s
        # Replicas of several models share this machine's cores: idle OpenMP threads
        # must sleep rather than spin, or replicas starting together starve each other.
        self._env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, **(extra_env or {})}
        # The mesh-internal token (a value from the entry point): replicas demand it
        # of their callers, and the fork server passes its environment to them.
        self.credentials = credentials or MeshCredentials(config.security.client_tls)
        token_env = config.security.internal_token_env
        if token_env and self.credentials.token:
            self._env[token_env] = self.credentials.token
        self._replicas: dict[str, ReplicaHandle] = {}
        self.config_id = ""
        self._generations = {m: generation(config, m) for m in config.scaled_models}
        self._tasks: set[asyncio.Task] = set()
        self._listeners: list[Callable[[], None]] = []
        self._ids = itertools.count(1)
        self._prefix = f"r{os.getpid()}-{int(time.time()) % 100000}"
        self._use_zygote = zygote
        self._zygote: asyncio.subprocess.Process | None = None
        self._zygote_lock = asyncio.Lock()

    # -- Provider ---------------------------------------------------------------------

    def replicas(self) -> list[ReplicaHandle]:
        return list(self._replicas.values())

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    async def scale(self, model: str, pool: str, desired: int, devices: list[str]) -> None:
        # Only the current generation counts: outgoing replicas are the controller's to retire.
        current = self._generations.get(model)
        live = [r for r in self._replicas.values()
                if r.model == model and r.pool == pool and r.state in LIVE and r.generation == current]
        if desired > len(live):
            for i in range(desired - len(live)):
                self._spawn(model, pool, devices[i] if i < len(devices) else "")
        elif desired < len(live):
            # Drain the ones still warming first (no traffic yet), then the newest ready.
            order = sorted(live, key=lambda r: (r.state == "ready", r.started_at))
            for handle in order[:len(live) - desired]:
                self._track(asyncio.create_task(self._drain(handle), name=f"drain-{handle.id}"))

    # -- rollouts (autoscaler.generations) ----------------------------------------------

    def apply(self, config: MeshConfig, config_path: str, config_id: str) -> None:
        self.config, self.config_path, self.config_id = config, str(config_path), config_id
        self._generations = {m: generation(config, m) for m in config.scaled_models}

    def outgoing(self, model: str) -> list[ReplicaHandle]:
        current = self._generations.get(model)
        return [r for r in self._replicas.values()
                if r.model == model and r.state in LIVE and r.generation != current]

    def retire(self, handle: ReplicaHandle) -> None:
        if handle.id in self._replicas and handle.state != "draining":
            handle.state = "draining"           # now, so nothing counts it while the drain starts
            self._track(asyncio.create_task(self._drain(handle), name=f"retire-{handle.id}"))

    def repool(self, pools: dict[str, str]) -> None:
        moved = 0
        for rid, pool in pools.items():
            handle = self._replicas.get(rid)
            if handle is not None and handle.pool != pool:
                handle.pool, moved = pool, moved + 1
        if moved:
            self._changed()

    async def close(self) -> None:
        for handle in list(self._replicas.values()):
            if handle.state != "draining":
                self._track(asyncio.create_task(self._drain(handle, notice_s=0.0)))
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        self._save()
        if self._zygote is not None and self._zygote.returncode is None:
            self._zygote.stdin.close()          # the fork server exits at end of input
            try:
                await asyncio.wait_for(self._zygote.wait(), timeout=10)
            except TimeoutError:
                self._zygote.kill()

    async def start(self) -> None:
        """Boot the fork server (imports the heavy libraries once); without it,
        replicas start as plain processes."""
        if not self._use_zygote:
            return
        self._zygote = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "autoscaler.providers.zygote", ",".join(self._model_types()),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=open(self.state_dir / "logs" / "zygote.log", "ab"),
            env=self._env)
        self._record_process("fork-server", self._zygote.pid)
        line = await self._zygote.stdout.readline()
        if not line.startswith(b'{"event": "ready"'):
            log.warning("replica fork server did not start; starting replicas as plain processes")
            self._zygote = None

    def _model_types(self) -> list[str]:
        """Architectures (config.json model_type) of the configured models in the store."""
        from cmesh.store import ModelStore

        store, types = ModelStore(self.config.store), set()
        for spec in self.config.scaled_models.values():
            for variant in spec.variant_sources().values():
                try:
                    cfg = store.open(variant.source).local_dir / "config.json"
                    types.add(json.loads(cfg.read_text()).get("model_type", ""))
                except Exception:  # noqa: BLE001 - not a Hugging Face model, or not built yet
                    continue
        return sorted(t for t in types if t)

    async def _fork(self, argv: list[str], fifo: Path, log_path: Path) -> int:
        async with self._zygote_lock:           # one request, one answer, in order
            request = {"argv": argv, "stdout": str(fifo), "log": str(log_path)}
            self._zygote.stdin.write((json.dumps(request) + "\n").encode())
            await self._zygote.stdin.drain()
            answer = json.loads(await self._zygote.stdout.readline() or b"{}")
        if "pid" not in answer:
            raise RuntimeError(f"fork server: {answer.get('error', 'no answer')}")
        return answer["pid"]

    # -- adoption ---------------------------------------------------------------------

    async def adopt(self) -> list[ReplicaHandle]:
        """Take over the live replicas a previous autoscaler left running."""
        path = self.state_dir / "replicas.json"
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError):
            return []
        adopted = []
        for entry in entries:
            pid = entry.get("pid")
            if not pid or not _alive(pid) or entry.get("model") not in self.config.models:
                continue
            handle = ReplicaHandle(id=entry["id"], model=entry["model"], pool=entry["pool"],
                                   device=entry.get("device", ""), state="ready", address=entry["address"],
                                   started_at=time.monotonic(), cold_start_s=entry.get("cold_start_s"),
                                   memory_mb=entry.get("memory_mb", 0), info={"pid": pid, "adopted": True},
                                   variants=tuple(entry.get("variants")
                                                  or self.config.models[entry["model"]].variant_sources()),
                                   generation=entry.get("generation") or self._generations.get(entry["model"], ""),
                                   config_id=entry.get("config_id", ""))
            if not await _serving(handle.address, self.credentials):
                continue
            self._replicas[handle.id] = handle
            handle.info["exited"] = _watch_exit(pid)
            self._track(asyncio.create_task(self._watch_adopted(handle), name=f"adopted-{handle.id}"))
            adopted.append(handle)
        if adopted:
            log.info("adopted %d running replica(s): %s", len(adopted), ", ".join(h.id for h in adopted))
            self._changed()
        return adopted

    # -- internals --------------------------------------------------------------------

    def _spawn(self, model: str, pool: str, device: str) -> ReplicaHandle:
        rid = f"{model}-{pool[0]}-{self._prefix}-{next(self._ids)}"
        spec = self.config.models[model]
        handle = ReplicaHandle(id=rid, model=model, pool=pool, device=device, state="warming",
                               started_at=time.monotonic(),
                               memory_mb=spec.resources.memory_mb or 0,
                               variants=tuple(spec.variant_sources()),
                               generation=self._generations.get(model, ""), config_id=self.config_id,
                               info={"config_path": self.config_path})
        self._replicas[rid] = handle
        self._changed()
        self._track(asyncio.create_task(self._run(handle), name=f"replica-{rid}"))
        return handle

    async def _run(self, handle: ReplicaHandle) -> None:
        log_path = self.state_dir / "logs" / f"{handle.id}.log"
        argv = ["--config", handle.info.get("config_path", self.config_path), "--models", handle.model, "--host", self.host, "--port", "0",
                "--metrics-port", "0", "--log-level", "WARNING"]
        if self._zygote is not None and self._zygote.returncode is None:
            fifo = self.state_dir / "fifos" / handle.id
            fifo.parent.mkdir(exist_ok=True)
            os.mkfifo(fifo)
            # Read-write, so the read side never sees EOF before the child connects.
            fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
            try:
                pid = await self._fork(argv, fifo, log_path)
                exited = self._started(handle, pid, _watch_exit(pid))
                ready = await _first_ready(_fifo_reader(fd), exited)
            finally:
                asyncio.get_running_loop().remove_reader(fd)
                os.close(fd)
                fifo.unlink(missing_ok=True)
        else:
            with open(log_path, "ab") as log_file:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "model_server", *argv, stdout=asyncio.subprocess.PIPE,
                    stderr=log_file, env=self._env, start_new_session=True)
            exited = self._started(handle, proc.pid, asyncio.ensure_future(proc.wait()))
            ready = await _first_ready(proc.stdout, exited)
        if ready is None:
            log.error("replica %s exited during start-up; see %s", handle.id, log_path)
            self._forget(handle)
            return
        if handle.state == "draining":         # scaled down while it was warming
            await self._stop_process(handle)
            self._forget(handle)
            return
        handle.address = f"{self.advertise_host}:{ready['port']}"
        handle.cold_start_s = ready.get("cold_start_s")
        handle.info["metrics_port"] = ready.get("metrics_port")
        handle.info["load_s"] = ready.get("models", {}).get(handle.model, {})
        handle.state = "ready"
        log.info("replica %s of %s ready at %s (cold start %.2fs)", handle.id, handle.model, handle.address,
                 handle.cold_start_s or 0.0)
        self._changed()
        await exited
        if handle.state != "draining":          # died on its own: the loop will replace it
            log.warning("replica %s of %s exited unexpectedly", handle.id, handle.model)
            self._forget(handle)

    async def replace(self, handle: ReplicaHandle, reason: str) -> None:
        """Stop a ready replica that failed its readiness probe. It leaves the
        endpoint table at once; no longer counted, it is succeeded by a new one
        on the control loop's next tick."""
        if handle.state != "ready" or handle.id not in self._replicas:
            return
        handle.info["replaced"] = reason
        handle.state = "draining"               # now, so the loop counts it gone at once
        self._changed()
        self._track(asyncio.create_task(self._drain(handle), name=f"replace-{handle.id}"))

    async def _drain(self, handle: ReplicaHandle, notice_s: float = ROUTER_NOTICE_S) -> None:
        handle.state = "draining"
        self._changed()                         # out of the endpoint table: routers stop sending
        if notice_s:
            await asyncio.sleep(notice_s)
        if handle.info.get("pid") is None:
            return                              # not started yet: _run stops it once it has a pid
        await self._stop_process(handle)
        self._forget(handle)

    async def _stop_process(self, handle: ReplicaHandle) -> None:
        """SIGTERM (the replica drains itself), then SIGKILL after the grace period."""
        pid = handle.info.get("pid")
        if not pid or not _alive(pid):
            return
        exited = handle.info.get("exited") or _watch_exit(pid)
        _signal(pid, signal.SIGTERM)            # NOT_SERVING, finish in-flight work, exit
        grace = self.grace_s + self.config.server.drain_delay_s + 2.0
        try:
            await asyncio.wait_for(asyncio.shield(exited), timeout=grace)
        except TimeoutError:
            pass
        if _alive(pid):
            log.warning("replica %s did not stop within %.1fs; SIGKILL", handle.id, grace)
            _signal(pid, signal.SIGKILL)

    async def _watch_adopted(self, handle: ReplicaHandle) -> None:
        await handle.info["exited"]
        if handle.state != "draining":
            log.warning("adopted replica %s of %s exited", handle.id, handle.model)
            self._forget(handle)

    def _started(self, handle: ReplicaHandle, pid: int, exited: asyncio.Future) -> asyncio.Future:
        handle.info["pid"], handle.info["exited"] = pid, exited
        self._record_process("replica", pid)
        return exited

    def _record_process(self, kind: str, pid: int) -> None:
        """Every process this provider starts, for operators (and tests) to check
        that nothing outlives a clean shutdown."""
        with open(self.state_dir / "processes.log", "a") as fh:
            fh.write(f"{kind} {pid}\n")

    def _forget(self, handle: ReplicaHandle) -> None:
        if self._replicas.pop(handle.id, None) is not None:
            self._changed()

    def _track(self, task: asyncio.Task) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _changed(self) -> None:
        self._save()
        for listener in self._listeners:
            listener()

    def _save(self) -> None:
        entries = [{"id": h.id, "model": h.model, "pool": h.pool, "device": h.device, "address": h.address,
                    "pid": h.info.get("pid"), "cold_start_s": h.cold_start_s, "memory_mb": h.memory_mb,
                    "generation": h.generation, "config_id": h.config_id, "variants": list(h.variants)}
                   for h in self._replicas.values() if h.state == "ready" and h.address]
        tmp = self.state_dir / "replicas.json.tmp"
        tmp.write_text(json.dumps(entries))
        tmp.replace(self.state_dir / "replicas.json")


async def _first_ready(reader: asyncio.StreamReader, exited: asyncio.Future) -> dict | None:
    """The replica's ready event, or None if the process exits first."""

    async def ready_line() -> dict | None:
        while line := await reader.readline():
            if line.startswith(b"{"):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == "ready":
                    return event
        return None

    reading = asyncio.ensure_future(ready_line())
    done, _ = await asyncio.wait({reading, exited}, return_when=asyncio.FIRST_COMPLETED)
    if reading in done:
        return reading.result()
    reading.cancel()
    return None


def _fifo_reader(fd: int) -> asyncio.StreamReader:
    """A StreamReader over a non-blocking FIFO fd (the event loop watches it)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()

    def readable() -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            reader.feed_data(data)
        else:
            loop.remove_reader(fd)
            reader.feed_eof()

    loop.add_reader(fd, readable)
    reader._cmesh_fd = fd   # noqa: SLF001 - keeps the fd's owner visible when debugging
    return reader


def _watch_exit(pid: int) -> asyncio.Future:
    """A future that completes when ``pid`` exits, for processes that are not our
    children (forked by the zygote, or adopted): pidfd where the kernel has it."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        async def poll() -> None:              # kernels before 5.3: no pidfd to wait on
            while _alive(pid):
                await asyncio.sleep(0.2)
            if not done.done():
                done.set_result(None)
        loop.create_task(poll())
        return done

    def exited() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        if not done.done():
            done.set_result(None)

    loop.add_reader(pidfd, exited)
    return done


async def _serving(address: str | None, credentials: MeshCredentials | None = None) -> bool:
    if not address:
        return False
    import grpc

    from protos import inference_pb2 as pb
    from protos import inference_pb2_grpc as pb_grpc

    try:
        async with open_internal_channel(address, credentials) as channel:
            reply = await pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(pb.ServerReadyRequest(), timeout=2)
            return reply.ready
    except grpc.aio.AioRpcError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still "exists": reap-or-check via /proc where possible.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
