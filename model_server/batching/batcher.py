"""The dynamic batcher: an asyncio queue per model, one engine thread.

The loop waits on an event (never polls), asks the pure policy what to run, and
runs the engine in a one-thread executor so the event loop keeps accepting
requests while a batch computes; whatever arrives meanwhile forms the next batch.
An engine that declares ``concurrent_batches > 1`` gets that many threads, and
the loop forms the next batch while earlier ones still run (up to that many).
Every request gets exactly one answer: its result, its own error, or - if the
engine broke the batch contract - a clear Internal error.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from cmesh.errors import Draining, Internal, MeshError, ResourceExhausted
from model_server.batching.policy import BatchPolicy, Pending, decide
from model_server.engines.base import Engine, InferItem, ItemResult
from model_server.metrics import ModelMetrics
from model_server.runner import Completion, StreamChunk

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Entry:
    item: InferItem
    future: asyncio.Future
    view: Pending
    arrived: float = field(default=0.0)


class DynamicBatcher:
    def __init__(self, engine: Engine, policy: BatchPolicy, *, max_queue_size: int,
                 metrics: ModelMetrics, executor: concurrent.futures.Executor | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.engine = engine
        self.policy = policy
        self.max_queue_size = max_queue_size
        self.metrics = metrics
        self._concurrency = max(1, int(engine.concurrent_batches))
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=self._concurrency, thread_name_prefix=f"engine-{engine.ctx.model}")
        self._slots = asyncio.Semaphore(self._concurrency)
        self._batches: set[asyncio.Task] = set()
        self._own_executor = executor is None
        # uvloop's loop.time() ticks in whole milliseconds; measure with monotonic.
        self._now = clock or time.monotonic
        self._pending: list[_Entry] = []
        self._running = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        self._last_batch_s = 0.0

    # -- Runner -------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"batcher-{self.engine.ctx.model}")

    async def stop(self) -> None:
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        if self._batches:
            await asyncio.gather(*list(self._batches), return_exceptions=True)
        if self._own_executor:
            self._executor.shutdown(wait=True)

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        return len(self._pending) + self._running

    async def infer(self, item: InferItem) -> Completion:
        entry = self._enqueue(item)
        try:
            return await asyncio.shield(entry.future)
        except asyncio.CancelledError:
            # The caller went away: withdraw the request if it has not run yet.
            if entry in self._pending:
                self._pending.remove(entry)
                self._update_gauges()
            entry.future.cancel()
            raise

    async def stream(self, item: InferItem) -> AsyncIterator[StreamChunk]:
        completion = await self.infer(item)
        yield StreamChunk(outputs=completion.result.outputs, final=True, completion=completion)

    # -- internals ----------------------------------------------------------------

    def _enqueue(self, item: InferItem) -> _Entry:
        if self._closing:
            raise Draining("model server is draining; send to another replica",
                           component=self.engine.ctx.model)
        if len(self._pending) >= self.max_queue_size:
            # Suggest roughly the time to work off the queue at the last batch speed.
            batches = len(self._pending) / max(self.policy.max_batch_size, 1)
            retry_ms = max(1, int(batches * self._last_batch_s * 1000))
            raise ResourceExhausted(f"queue of {self.engine.ctx.model!r} is full "
                                    f"({self.max_queue_size} waiting)",
                                    component=self.engine.ctx.model, retry_after_ms=retry_ms)
        now = self._now()
        view = Pending(arrived=now, rows=item.rows, bucket=self.policy.bucket_of(item.length))
        entry = _Entry(item=item, future=asyncio.get_running_loop().create_future(),
                       view=view, arrived=now)
        self._pending.append(entry)
        self._update_gauges()
        self._wakeup.set()
        return entry

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(len(self._pending))
        self.metrics.in_flight.set(len(self._pending) + self._running)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            decision = decide(self.policy, [e.view for e in self._pending], self._now(),
                              flush=self._closing)
            if not decision.take:
                self._wakeup.clear()
                # A relative timer works with any injected clock measured in seconds.
                timer = loop.call_later(max(0.0, decision.wake_at - self._now()), self._wakeup.set)
                try:
                    await self._wakeup.wait()
                finally:
                    timer.cancel()
                continue
            chosen = set(decision.take)
            batch = [e for i, e in enumerate(self._pending) if i in chosen]
            self._pending = [e for i, e in enumerate(self._pending) if i not in chosen]
            if self._concurrency == 1:
                await self._run(batch)
                continue
            await self._slots.acquire()
            task = asyncio.create_task(self._run_in_slot(batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _run_in_slot(self, batch: list[_Entry]) -> None:
        try:
            await self._run(batch)
        finally:
            self._slots.release()

    async def _run(self, batch: list[_Entry]) -> None:
        batch = [e for e in batch if not e.future.done()]   # callers that gave up
        if not batch:
            self._update_gauges()
            return
        self._running += len(batch)
        self._update_gauges()
        loop = asyncio.get_running_loop()
        items = [e.item for e in batch]
        started = self._now()
        try:
            results = await loop.run_in_executor(self._executor, self.engine.run_batch, items)
            if len(results) != len(items):
                raise Internal(f"engine {self.engine.kind!r} returned {len(results)} results "
                               f"for {len(items)} requests", component=self.engine.ctx.model)
        except Exception as exc:  # noqa: BLE001 - isolate, then answer every request
            log.warning("batch of %d failed (%s); rerunning requests one by one", len(items), exc)
            results = await self._isolate(items)
        elapsed = self._now() - started
        self._last_batch_s = elapsed
        total_rows = sum(it.rows for it in items) or 1
        self.metrics.observe_batch(total_rows, elapsed)
        for entry, result in zip(batch, results):
            self.metrics.queue_seconds.observe(started - entry.arrived)
            if not entry.future.done():
                entry.future.set_result(Completion(
                    result=result, queue_s=started - entry.arrived,
                    compute_s=elapsed * entry.item.rows / total_rows, batch_sizes=[total_rows]))
        self._running -= len(batch)
        self._update_gauges()

    async def _isolate(self, items: list[InferItem]) -> list[ItemResult]:
        """After a failed batch, run each request alone so only the culprit fails."""
        loop = asyncio.get_running_loop()
        results = []
        for item in items:
            try:
                (result,) = await loop.run_in_executor(self._executor, self.engine.run_batch, [item])
            except MeshError as exc:
                result = ItemResult(error=exc)
            except Exception as exc:  # noqa: BLE001
                result = ItemResult(error=Internal(f"engine {self.engine.kind!r} failed: {exc}",
                                                   component=self.engine.ctx.model))
            results.append(result)
        return results
