"""Runs one pipeline request over its DAG: parallel fan-out, optional nodes,
fallbacks, one shared deadline, streamed tokens and a trace (DESIGN.md §4, §5).

Event-driven, no polling: a node's task is created the moment its last
dependency finishes (the scheduler wakes on ``asyncio.wait(FIRST_COMPLETED)``),
so independent nodes run concurrently. ``when`` gates and the deadline check run
in the scheduler before a task exists, so a skipped node never reaches a model.

Models are reached only through the injected ``call_node``; the clock is
injected too (monotonic seconds, the same timeline as ``deadline``). Timeouts
are armed on the event loop as *remaining* time, so any clock with a seconds
rate works.

Failure policy, per node:

* required node fails -> the run fails with that error (code kept, pipeline and
  node filled in, message prefixed with both); running nodes are cancelled and
  awaited before the error leaves ``run``.
* optional node fails, times out, or its breaker is open -> status "degraded",
  output None, the run goes on and ``PipelineOutcome.degraded`` is True.
* ``fallback`` model: tried with the same inputs when the node's model answers
  UNAVAILABLE (breaker open, no replica, draining...) or exceeds the node's own
  ``timeout_ms`` -- never when the pipeline's deadline is what ran out, and never
  after tokens were streamed (the client already holds part of an answer).
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from cmesh.config import NodeConfig
from cmesh.errors import DeadlineExceeded, Internal, InvalidInput, MeshError
from cmesh.expr import evaluate, truthy
from protos import mesh_pb2
from router.pipelines.graph import REQUEST, PipelineGraph
from router.pipelines.trace import build_trace, node_trace

log = logging.getLogger(__name__)


@dataclass
class NodeResult:
    """What one model call produced, as ``call_node`` reports it."""

    outputs: dict[str, Any]
    queue_ms: float = 0.0
    cold_start_ms: float = 0.0
    compute_ms: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    variant: str = ""
    model_used: str = ""        # empty: the model that was asked
    replica: str = ""
    cost: float = 0.0


TokenSink = Callable[[str], Awaitable[None]]
# call_node(node, node_config, model, inputs_env, deadline, on_token). `model` is the
# node's model or its fallback; `inputs_env` maps "request" and every ancestor node to
# its outputs (None when skipped/degraded); `deadline` is monotonic seconds on the
# executor's clock; `on_token` is None unless this call should stream, and must be
# awaited per token, with its exceptions left to propagate.
CallNode = Callable[[str, NodeConfig, str, dict[str, Any], float, TokenSink | None],
                    Awaitable[NodeResult]]
# Receives mesh_pb2.RunEvent (node_started / node_finished / token); sync or async.
EventSink = Callable[[mesh_pb2.RunEvent], Awaitable[None] | None]


@dataclass
class PipelineOutcome:
    pipeline: str
    output: str                                # the output node's name
    outputs: dict[str, dict[str, Any] | None]  # per node, topological order; None: skipped/degraded
    answer: str                                # the output node's text (``answer_text``)
    answer_outputs: dict[str, Any] | None      # the output node's outputs, as call_node gave them
    trace: mesh_pb2.Trace
    degraded: bool


def answer_text(outputs: dict[str, Any] | None) -> str:
    """The output node's outputs as text: its ``text`` / ``answer`` / ``output``
    value, or its only value, else JSON of the whole mapping."""
    if not outputs:
        return ""
    value: Any = outputs
    for key in ("text", "answer", "output"):
        if key in outputs:
            value = outputs[key]
            break
    else:
        if len(outputs) == 1:
            value = next(iter(outputs.values()))
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


class PipelineExecutor:
    """Runs requests over one graph. Runs share nothing, so one executor may serve
    concurrent requests; only ``trace()`` (the latest run's) assumes one at a time."""

    def __init__(self, graph: PipelineGraph, call_node: CallNode,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.graph = graph
        self._call_node = call_node
        self._clock = clock
        self._last: _Run | None = None

    async def run(self, request_inputs: dict[str, Any], deadline: float,
                  events: EventSink | None = None, *, stream: bool = False) -> PipelineOutcome:
        """Run the pipeline once. ``deadline`` is monotonic seconds on the injected
        clock; ``stream`` asks for the output node's tokens (if it has ``stream: true``).
        Raises the failing required node's MeshError (annotated), or DeadlineExceeded."""
        self._last = _Run(self, request_inputs, deadline, events, stream)
        return await self._last.execute()

    def trace(self) -> mesh_pb2.Trace:
        """The latest run's trace, also after it failed: the nodes that finished,
        the one that failed ("failed") and those cut short ("cancelled"); the
        critical path then leads to the failed node. For metrics in a ``finally``."""
        if self._last is None:
            return mesh_pb2.Trace(pipeline=self.graph.name)
        return self._last.trace()


class _Run:
    """The state of one request; scheduler methods run on the caller's task."""

    def __init__(self, ex: PipelineExecutor, request_inputs: dict[str, Any], deadline: float,
                 events: EventSink | None, stream: bool) -> None:
        self.graph = ex.graph
        self.pipeline = ex.graph.name
        self.call_node = ex._call_node
        self.clock = ex._clock
        self.request = request_inputs
        self.deadline = deadline
        self.events = events
        self.stream = stream
        self.t0 = self.clock()
        self.outputs: dict[str, dict[str, Any] | None] = {}
        self.spans: dict[str, mesh_pb2.NodeTrace] = {}
        self.waiting = {n: len(self.graph.deps[n]) for n in self.graph.order}
        self.tasks: dict[asyncio.Task, str] = {}
        self.degraded = False
        self.failed: mesh_pb2.NodeTrace | None = None    # the required node that failed the run
        self.started: dict[str, float] = {}               # running node -> start ms
        self.end_ms: float | None = None
        self.tokens_sent = 0
        self.sink_error: BaseException | None = None
        self.emit_lock = asyncio.Lock()   # tokens and node events never interleave mid-delivery

    def ms(self) -> float:
        return (self.clock() - self.t0) * 1000.0

    # -- scheduler -----------------------------------------------------------------

    async def execute(self) -> PipelineOutcome:
        try:
            roots = [n for n in self.graph.order if self.waiting[n] == 0]
            await self._emit_all(self._launch(roots))
            while self.tasks:
                done, _ = await asyncio.wait(self.tasks, return_when=asyncio.FIRST_COMPLETED)
                finished, ready = [], []
                for task in sorted(done, key=lambda t: self.graph.order.index(self.tasks[t])):
                    node = self.tasks.pop(task)
                    span, outputs = task.result()          # a required node's failure raises here
                    ready += self._complete(node, outputs, span)
                    finished.append(mesh_pb2.RunEvent(node_finished=span))
                # Dependents are launched before any event is delivered, so a slow
                # event sink never delays a model call.
                started = self._launch(ready)
                await self._emit_all(finished + started)
        except BaseException as exc:
            await self._cancel_running()
            self.end_ms = self.ms()
            span = self.spans.get(exc.node) if isinstance(exc, MeshError) else None
            if span is not None and span.status == "failed":
                self.failed = span
                try:
                    await self._emit(mesh_pb2.RunEvent(node_finished=self.failed))
                except Exception:   # the node's error matters more than a broken sink
                    log.debug("event sink failed while reporting %s", self.failed.node, exc_info=True)
            raise
        self.end_ms = self.ms()
        answer = self.outputs[self.graph.output]
        return PipelineOutcome(pipeline=self.pipeline, output=self.graph.output,
                               outputs={n: self.outputs[n] for n in self.graph.order},
                               answer=answer_text(answer), answer_outputs=answer, trace=self.trace(),
                               degraded=self.degraded)

    def trace(self) -> mesh_pb2.Trace:
        spans = [self.spans[n] for n in self.graph.order if n in self.spans]
        end = self.graph.output if self.graph.output in self.spans else (
            self.failed.node if self.failed is not None else self.graph.output)
        total = self.end_ms if self.end_ms is not None else self.ms()
        return build_trace(self.pipeline, spans, self.graph.deps, end, total)

    def _launch(self, ready: list[str]) -> list[mesh_pb2.RunEvent]:
        """Start every ready node (gating skips and exhausted budgets inline, which
        may make more nodes ready); returns the events to deliver."""
        events: list[mesh_pb2.RunEvent] = []
        queue = list(ready)
        while queue:
            node = queue.pop(0)
            cfg = self.graph.node(node)
            env = self._env(node)
            now = self.ms()
            span: mesh_pb2.NodeTrace | None = None
            try:
                run_it = self._when(node, cfg, env)
            except MeshError as err:
                span = self._fail_or_degrade(node, cfg, err, now)
            else:
                if not run_it:
                    span = node_trace(node, cfg.model, "skipped", now, now)
                elif self.clock() >= self.deadline:
                    span = self._fail_or_degrade(node, cfg, self._deadline_error(node, cfg.model, False), now)
            if span is not None:
                queue += self._complete(node, None, span)
                events.append(mesh_pb2.RunEvent(node_finished=span))
                continue
            task = asyncio.get_running_loop().create_task(self._run_node(node, cfg, env, now),
                                                          name=f"pipeline {self.pipeline} node {node}")
            self.tasks[task] = node
            self.started[node] = now
            events.append(mesh_pb2.RunEvent(
                node_started=mesh_pb2.NodeStarted(node=node, model=cfg.model, at_ms=now)))
        return events

    def _complete(self, node: str, outputs: dict[str, Any] | None,
                  span: mesh_pb2.NodeTrace) -> list[str]:
        self.outputs[node] = outputs
        self.spans[node] = span
        ready = []
        for m in self.graph.dependents[node]:
            self.waiting[m] -= 1
            if self.waiting[m] == 0:
                ready.append(m)
        return ready

    def _env(self, node: str) -> dict[str, Any]:
        # Every ancestor is finished by now, so the env does not depend on timing.
        env: dict[str, Any] = {REQUEST: self.request}
        for a in self.graph.ancestors[node]:
            env[a] = self.outputs.get(a)
        return env

    def _when(self, node: str, cfg: NodeConfig, env: dict[str, Any]) -> bool:
        expr = self.graph.when.get(node)
        if expr is None:
            return True
        try:
            return truthy(evaluate(expr, env))
        except Exception as exc:   # ExprError, or whatever odd request data makes an operator raise
            raise InvalidInput("when", f"cannot evaluate {cfg.when!r}: {exc}",
                               pipeline=self.pipeline, node=node, component=cfg.model) from exc

    async def _cancel_running(self) -> None:
        now = self.ms()
        for task, node in self.tasks.items():
            if not task.done():
                self.spans[node] = node_trace(node, self.graph.node(node).model, "cancelled",
                                              self.started[node], now, error="CANCELLED: the run ended")
                task.cancel()
            elif not task.cancelled() and task.exception() is None:
                self.spans[node] = task.result()[0]   # finished alongside the failure: keep its span
        # Awaited so no model call outlives the run that asked for it.
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()

    # -- one node ------------------------------------------------------------------

    async def _run_node(self, node: str, cfg: NodeConfig, env: dict[str, Any], start: float
                        ) -> tuple[mesh_pb2.NodeTrace, dict[str, Any] | None]:
        """Returns the node's span and outputs; raises only for a required failure
        (or the event sink's own error)."""
        on_token = self._on_token if (self.stream and cfg.stream and node == self.graph.output) else None
        try:
            result = await self._attempt(node, cfg, cfg.model, env, on_token)
            return self._ok_span(node, cfg, "ok", start, result, cfg.model), result.outputs
        except MeshError as err:
            failure = err
        if cfg.fallback and _wants_fallback(failure) and self.tokens_sent == 0:
            log.info("pipeline %s node %s: %s failed (%s), trying fallback %s",
                     self.pipeline, node, cfg.model, failure.code.name, cfg.fallback)
            try:
                result = await self._attempt(node, cfg, cfg.fallback, env, on_token)
                span = self._ok_span(node, cfg, "fallback", start, result, cfg.fallback,
                                     error=f"{cfg.model}: {failure.message}")
                return span, result.outputs
            except MeshError as err:
                err.message = f"{err.message} (fallback after {cfg.model}: {failure.message})"
                err.args = (err.message,)
                failure = err
        return self._fail_or_degrade(node, cfg, failure, start), None

    async def _attempt(self, node: str, cfg: NodeConfig, model: str, env: dict[str, Any],
                       on_token: TokenSink | None) -> NodeResult:
        now = self.clock()
        left = self.deadline - now
        if left <= 0:
            raise self._deadline_error(node, model, False)
        own_timeout = cfg.timeout_ms is not None and cfg.timeout_ms / 1000.0 < left
        node_deadline = now + cfg.timeout_ms / 1000.0 if own_timeout else self.deadline
        timer = asyncio.timeout(node_deadline - now)
        try:
            async with timer:
                return await self.call_node(node, cfg, model, env, node_deadline, on_token)
        except TimeoutError as exc:
            if not timer.expired():
                raise Internal(f"{model} raised TimeoutError: {exc}", component=model) from exc
            raise self._deadline_error(node, model, own_timeout, timeout_ms=cfg.timeout_ms) from None
        except DeadlineExceeded as exc:
            # The call was given node_deadline, so its own deadline error means the same
            # as our timer firing; reworded so the message names the node and pipeline.
            raise self._deadline_error(node, model, own_timeout, timeout_ms=cfg.timeout_ms,
                                       component=exc.component) from exc
        except MeshError:
            raise
        except Exception as exc:
            if exc is self.sink_error:
                raise
            log.exception("pipeline %s node %s: call to %s raised", self.pipeline, node, model)
            raise Internal(f"{model} call failed: {type(exc).__name__}: {exc}", component=model) from exc

    def _deadline_error(self, node: str, model: str, own_timeout: bool, *, timeout_ms: int | None = None,
                        component: str = "") -> DeadlineExceeded:
        where = f"pipeline {self.pipeline!r} node {node!r}"
        if own_timeout:
            err = DeadlineExceeded(f"{where}: {model} did not answer within the node's "
                                   f"timeout_ms={timeout_ms}", component=component or model,
                                   pipeline=self.pipeline, node=node)
            err.reason = "node_timeout"          # tells fallback this was the node's own limit
            return err
        return DeadlineExceeded(f"{where}: the pipeline's deadline ran out at this node ({model})",
                                component=component or model, pipeline=self.pipeline, node=node)

    def _fail_or_degrade(self, node: str, cfg: NodeConfig, err: MeshError, start: float
                         ) -> mesh_pb2.NodeTrace:
        """An optional node's failure becomes a degraded span; a required one's is
        annotated and raised."""
        if cfg.optional:
            self.degraded = True
            log.info("pipeline %s: optional node %s degraded: %s", self.pipeline, node, err.message)
            return node_trace(node, cfg.model, "degraded", start, self.ms(),
                              error=f"{err.code.name}: {err.message}")
        where = f"pipeline {self.pipeline!r} node {node!r}"
        if not err.message.startswith(where):
            err.message = f"{where}: {err.message}"
            err.args = (err.message,)
        err.pipeline, err.node = self.pipeline, node
        # Recorded here, where the timing is known; the scheduler picks it up by err.node.
        self.spans[node] = node_trace(node, cfg.model, "failed", start, self.ms(),
                                      error=f"{err.code.name}: {err.message}")
        raise err

    def _ok_span(self, node: str, cfg: NodeConfig, status: str, start: float, result: NodeResult,
                 model: str, error: str = "") -> mesh_pb2.NodeTrace:
        return node_trace(node, cfg.model, status, start, self.ms(), queue_ms=result.queue_ms,
                          cold_start_ms=result.cold_start_ms, compute_ms=result.compute_ms,
                          variant=result.variant, model_used=result.model_used or model, error=error,
                          input_tokens=result.input_tokens, output_tokens=result.output_tokens,
                          cost=result.cost)

    # -- events --------------------------------------------------------------------

    async def _on_token(self, text: str) -> None:
        self.tokens_sent += 1
        try:
            await self._emit(mesh_pb2.RunEvent(token=text))
        except Exception as exc:
            self.sink_error = exc    # the caller's problem, not the model's: re-raised as is
            raise

    async def _emit_all(self, events: list[mesh_pb2.RunEvent]) -> None:
        for event in events:
            await self._emit(event)

    async def _emit(self, event: mesh_pb2.RunEvent) -> None:
        if self.events is None:
            return
        async with self.emit_lock:
            result = self.events(event)
            if inspect.isawaitable(result):
                await result


def _wants_fallback(err: MeshError) -> bool:
    # By status code, not class: a replica's error arrives as the router's
    # BackendError carrying the code the replica (or the breaker) answered with.
    return err.code.name == "UNAVAILABLE" or (err.code.name == "DEADLINE_EXCEEDED"
                                              and err.reason == "node_timeout")
