"""The step loop of a generative model: continuous batching around a pure scheduler.

One asyncio task owns the loop. It sleeps on an event while there is nothing to
do (no polling), and otherwise runs ``schedule -> engine.step (worker thread)
-> update`` back to back, pushing each sequence's text piece into that request's
queue. A request that arrives mid-generation is admitted at the next step, so it
joins the running decode. Everything that touches tensors runs on the single
worker thread; the event loop only plans, routes pieces and keeps the books.

Errors: submission errors (queue full, draining) are raised to the caller. A
step that raises fails exactly the sequences in that step - each gets a final
answer carrying an ``Internal`` error - and the loop goes on with the others.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from cmesh.errors import Draining, Internal, MeshError, ResourceExhausted, Unavailable
from model_server.engines.base import EngineContext, InferItem, ItemResult
from model_server.generation.scheduler import (
    FinishReason,
    QueueFull,
    Scheduler,
    SchedulerOutput,
    Sequence,
    TokenOutput,
)
from model_server.metrics import ModelMetrics
from model_server.runner import Completion, StreamChunk

log = logging.getLogger(__name__)

OUTPUT = "text_output"


class StepEngine(Protocol):
    """What the runner needs from a generative engine (``HFCausalLMEngine`` has it)."""

    ctx: EngineContext
    stop_token_ids: frozenset[int]

    def new_sequence(self, item: InferItem) -> Any:
        """Compute-side state of one request; has ``max_tokens``. Cheap, no compute."""

    def step(self, prefill: list[Any], decode: list[Any]) -> list[TokenOutput]:
        """One output per state, in the order ``prefill + decode``. Worker thread."""


def _piece(text: str) -> dict[str, np.ndarray]:
    return {OUTPUT: np.array([text.encode("utf-8")], dtype=object)}


@dataclass(eq=False)
class _Request:
    seq: Sequence
    state: Any
    chunks: asyncio.Queue[StreamChunk]
    pieces: list[str] = field(default_factory=list)
    compute_s: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)
    done: bool = False


class GenerationRunner:
    """``Runner`` for generative engines: iteration-level batching, token streaming.

    ``max_batch_size`` caps the sequences decoding together; ``max_queue_size``
    caps those waiting for a slot. ``max_prefill_tokens`` optionally caps the
    prompt tokens admitted per step. The executor must run one task at a time (a
    one-thread pool is made when none is given, and shut down by ``stop``; an
    injected one belongs to the caller). ``clock`` is injectable for tests.
    """

    def __init__(self, engine: StepEngine, *, max_batch_size: int, max_queue_size: int,
                 metrics: ModelMetrics, executor: concurrent.futures.Executor | None = None,
                 max_prefill_tokens: int | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self._scheduler = Scheduler(max_batch_size=max_batch_size, max_queue_size=max_queue_size,
                                    max_prefill_tokens=max_prefill_tokens)
        self._own_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"generate-{self._component}")
        self._now = clock or time.monotonic
        self._ids = itertools.count(1)
        self._requests: dict[int, _Request] = {}
        self._wakeup = asyncio.Event()
        self._accepting = False
        self._closing = False
        self._task: asyncio.Task | None = None
        self._step_s = 0.0          # moving average of step time, for retry-after hints

    @property
    def _component(self) -> str:
        ctx = getattr(self.engine, "ctx", None)
        return ctx.model if ctx is not None else "generator"

    # -- Runner -------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._accepting = True
            self._task = asyncio.create_task(self._loop(), name=f"generate-{self._component}")

    async def stop(self) -> None:
        """Refuse new requests, finish every accepted one, then end the loop."""
        self._accepting = False
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        if self._own_executor:
            self._executor.shutdown(wait=True)

    @property
    def queue_depth(self) -> int:
        return self._scheduler.num_waiting

    @property
    def in_flight(self) -> int:
        return self._scheduler.num_waiting + self._scheduler.num_running

    async def infer(self, item: InferItem) -> Completion:
        """The whole answer at once (the completion's result holds the full text, or
        the error). Cancelling the caller withdraws the request."""
        request = self._submit(item)
        try:
            while True:
                chunk = await request.chunks.get()
                if chunk.final:
                    assert chunk.completion is not None
                    return chunk.completion
        finally:
            self._withdraw(request)

    async def stream(self, item: InferItem) -> AsyncIterator[StreamChunk]:
        """One chunk per generated token (its text piece, possibly empty while a
        multi-byte character is incomplete). The last chunk has ``final`` and the
        ``Completion``, whose result holds the full text (or the error, in which case
        the chunk's own outputs are empty). Closing the iterator withdraws it."""
        request = self._submit(item)
        try:
            while True:
                chunk = await request.chunks.get()
                yield chunk
                if chunk.final:
                    return
        finally:
            self._withdraw(request)

    # -- submission and withdrawal ---------------------------------------------------

    def _submit(self, item: InferItem) -> _Request:
        if not self._accepting:
            raise Draining(f"model {self._component!r} is not accepting requests "
                           f"(draining or stopped); send to another replica",
                           component=self._component)
        if self._scheduler.queue_full:
            raise ResourceExhausted(
                f"queue of {self._component!r} is full ({self._scheduler.max_queue_size} waiting)",
                component=self._component, retry_after_ms=self._retry_after_ms())
        state = self.engine.new_sequence(item)
        seq = Sequence(seq_id=next(self._ids), prompt_tokens=item.input_tokens,
                       max_tokens=state.max_tokens, arrival=self._now(),
                       stop_token_ids=self.engine.stop_token_ids)
        try:
            self._scheduler.add(seq)
        except QueueFull:   # checked above; kept so the scheduler stays the authority
            raise ResourceExhausted(f"queue of {self._component!r} is full",
                                    component=self._component,
                                    retry_after_ms=self._retry_after_ms()) from None
        request = _Request(seq=seq, state=state, chunks=asyncio.Queue())
        self._requests[seq.seq_id] = request
        self._update_gauges()
        self._wakeup.set()
        return request

    def _withdraw(self, request: _Request) -> None:
        """The caller is gone (or done): drop the sequence and its cache. A step that
        is running with it finishes; its output is then ignored."""
        if not request.done:
            request.done = True
            self._scheduler.cancel(request.seq.seq_id)
        self._requests.pop(request.seq.seq_id, None)
        request.state = None        # the KV cache goes with the last reference
        self._update_gauges()

    def _retry_after_ms(self) -> int:
        # A slot frees when the closest-to-done running sequence finishes.
        running = self._scheduler.running
        steps = min((s.remaining for s in running), default=1) or 1
        return max(10, min(10_000, int(steps * self._step_s * 1000)))

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(self.queue_depth)
        self.metrics.in_flight.set(self.in_flight)

    # -- the step loop ----------------------------------------------------------------

    async def _loop(self) -> None:
        try:
            await self._steps()
        finally:
            # Only reached with work left if the task was cancelled (event loop shutting
            # down): answer everyone rather than leave them waiting forever.
            leftover = list(self._scheduler.waiting) + list(self._scheduler.running)
            if leftover:
                self._fail(leftover, "generation loop stopped", error_type=Unavailable)
                self._update_gauges()

    async def _steps(self) -> None:
        while True:
            if not self._scheduler.has_work:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            plan = self._scheduler.schedule(self._now())
            if plan.empty:      # cannot happen with has_work; guard against a spin
                log.error("scheduler planned an empty step with work pending")
                self._fail(list(self._scheduler.waiting) + list(self._scheduler.running),
                           "scheduler planned an empty step")
                continue
            try:
                await self._step(plan)
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any one step
                log.exception("generation step failed")
                self._fail(plan.sequences, f"generation step failed: {exc}")
            self._update_gauges()

    async def _step(self, plan: SchedulerOutput) -> None:
        loop = asyncio.get_running_loop()
        for seq in plan.prefill:
            self.metrics.queue_seconds.observe(seq.scheduled_at - seq.arrival)
        prefill = [self._requests[s.seq_id].state for s in plan.prefill]
        decode = [self._requests[s.seq_id].state for s in plan.decode]
        self._update_gauges()
        started = self._now()
        outputs = await loop.run_in_executor(self._executor, self.engine.step, prefill, decode)
        elapsed = self._now() - started
        if len(outputs) != plan.size:
            raise Internal(f"engine returned {len(outputs)} outputs for {plan.size} sequences",
                           component=self._component)
        self._step_s = elapsed if self._step_s == 0 else 0.8 * self._step_s + 0.2 * elapsed
        self.metrics.observe_batch(plan.size, elapsed)
        share = elapsed / plan.size
        for seq in plan.sequences:
            request = self._requests.get(seq.seq_id)
            if request is not None:
                request.compute_s += share
                request.batch_sizes.append(plan.size)
        updates = self._scheduler.update(
            {seq.seq_id: out for seq, out in zip(plan.sequences, outputs)})
        for update in updates:
            request = self._requests.get(update.seq.seq_id)
            if request is None:
                continue
            request.pieces.append(update.output.text)
            if update.finished:
                request.done = True
                request.state = None    # free its KV cache now, not when the caller reads
                request.chunks.put_nowait(StreamChunk(outputs=_piece(update.output.text), final=True,
                                                      completion=self._completion(request)))
            else:
                request.chunks.put_nowait(StreamChunk(outputs=_piece(update.output.text)))

    def _fail(self, sequences: tuple[Sequence, ...] | list[Sequence], message: str,
              error_type: type[MeshError] = Internal) -> None:
        failed = self._scheduler.abort([s.seq_id for s in sequences], FinishReason.ERROR)
        for seq in failed:
            request = self._requests.get(seq.seq_id)
            if request is None:
                continue
            request.done = True
            request.state = None
            error = error_type(message, component=self._component)
            request.chunks.put_nowait(StreamChunk(outputs={}, final=True,
                                                  completion=self._completion(request, error)))

    def _completion(self, request: _Request, error: MeshError | None = None) -> Completion:
        seq = request.seq
        queued = (seq.scheduled_at if seq.scheduled_at is not None else self._now()) - seq.arrival
        outputs = {} if error is not None else _piece("".join(request.pieces))
        result = ItemResult(outputs=outputs, error=error, output_tokens=len(seq.output_tokens))
        return Completion(result=result, queue_s=queued, compute_s=request.compute_s,
                          batch_sizes=list(request.batch_sizes))
