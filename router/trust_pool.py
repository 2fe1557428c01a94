"""Worker processes that mask large texts off the router's event loop.

Python's ``re`` holds the GIL, so a thread would still stall the loop: masking
16 MiB takes about 3 s of CPU. Texts above the trust layer's inline size go to a
few ``python -m router.trust_worker`` children instead (plain subprocesses, not
multiprocessing: that would re-import the router's whole ``__main__`` in each).
They start on first use, are replaced when one dies, and at most
``max_waiting`` requests wait for them: more are shed with RESOURCE_EXHAUSTED
rather than queued without bound.
"""
from __future__ import annotations

import asyncio
import logging
import pickle
import sys
from typing import Any

from cmesh.bytes_elements import Malformed
from cmesh.errors import ResourceExhausted, Unavailable
from router.trust_worker import HEADER

log = logging.getLogger(__name__)


class WorkerFailed(Exception):
    pass


class _Worker:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def call(self, name: str, args: tuple) -> Any:
        data = pickle.dumps((name, args), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.proc.stdin.write(HEADER.pack(len(data)) + data)
            await self.proc.stdin.drain()
            size = HEADER.unpack(await self.proc.stdout.readexactly(HEADER.size))[0]
            answer = pickle.loads(await self.proc.stdout.readexactly(size))
        except (OSError, RuntimeError, asyncio.IncompleteReadError, EOFError) as exc:
            # RuntimeError: asyncio's "handler is closed" once the worker's pipes are gone.
            raise WorkerFailed(f"{type(exc).__name__}: {exc} (worker exit code {self.proc.returncode})") from None
        if answer[0] == "ok":
            return answer[1]
        if answer[1] == Malformed.__name__:
            raise Malformed(answer[2])
        raise WorkerFailed(f"{answer[1]}: {answer[2]}")

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and not self.proc.stdin.is_closing()

    def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


class MaskPool:
    def __init__(self, workers: int = 1, max_waiting: int = 16) -> None:
        self.workers = workers
        self.max_waiting = max_waiting
        self._idle: asyncio.Queue[_Worker] | None = None
        self._all: list[_Worker] = []
        self._waiting = 0
        self._starting: asyncio.Lock | None = None

    async def _spawn(self) -> _Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "router.trust_worker", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, limit=2**20)
        worker = _Worker(proc)
        self._all.append(worker)
        return worker

    async def start(self) -> None:
        """Start the workers now (otherwise the first large text starts them)."""
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._idle is None:
                idle: asyncio.Queue[_Worker] = asyncio.Queue()
                for _ in range(self.workers):
                    idle.put_nowait(await self._spawn())
                self._idle = idle

    async def run(self, name: str, *args: Any) -> Any:
        """``router.trust_worker.FUNCTIONS[name](*args)`` in a worker."""
        if self._waiting >= self.max_waiting:
            raise ResourceExhausted(f"the trust layer has {self._waiting} large texts waiting to be "
                                    "masked; retry later", retry_after_ms=100, component="trust")
        self._waiting += 1
        try:
            await self.start()
            assert self._idle is not None
            worker = await self._idle.get()
            if not worker.alive:
                log.error("a trust-layer worker exited (code %s) while idle; starting another",
                          worker.proc.returncode)
                self._all.remove(worker)
                worker = await self._spawn()
            # Shielded: a caller that leaves (client disconnect) must not leave the
            # worker's pipe mid-exchange; the answer is read and the worker reused.
            return await asyncio.shield(self._call(worker, name, args))
        finally:
            self._waiting -= 1

    async def _call(self, worker: _Worker, name: str, args: tuple) -> Any:
        assert self._idle is not None
        try:
            return await worker.call(name, args)
        except WorkerFailed as exc:
            log.error("a trust-layer worker failed (%s); starting another", exc)
            worker.close()
            self._all.remove(worker)
            worker = await self._spawn()
            raise Unavailable("the trust layer's worker failed while masking; retry",
                              component="trust") from None
        finally:
            self._idle.put_nowait(worker)

    def close(self) -> None:
        for worker in self._all:
            worker.close()
        self._all.clear()
        self._idle = None
