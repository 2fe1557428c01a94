"""cmesh.v1.Pipelines served by the router: Run, RunStream, Describe.

Thin: who is calling (the router's front door), then the transport-agnostic
executor with node calls that go through the router core, then the answer, the
trace with its critical path, and the cost of every node.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from cmesh.cost import price
from cmesh import wire
from cmesh.errors import Internal, InvalidInput, MeshError, NotFound, abort_with, quote
from cmesh.rpc import guarded
from protos import mesh_pb2, mesh_pb2_grpc
from router.manifests import ManifestCache
from router.pipelines.calls import NodeCaller
from router.pipelines.executor import PipelineExecutor
from router.pipelines.graph import PipelineGraph
from router.pipelines.metrics import PipelineMetrics
from router.pipelines.trace import share_of_critical_path
from router.servicer import answer_margin_s

log = logging.getLogger(__name__)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic,)):
        return value.item()
    return value


def remaining_of(context, default_s: float) -> float:
    """The time a gRPC caller gave us, less the margin our own error needs to reach it."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e9:
        return default_s
    return remaining - answer_margin_s(remaining)


class PipelineRunner:
    """Runs a pipeline for an authenticated principal, independent of the transport:
    the gRPC servicer below and the OpenAI front door (``router.openai``) both call it."""

    def __init__(self, core, door, metrics: PipelineMetrics, manifests: ManifestCache, clock=time.monotonic,
                 spans=None) -> None:
        self.core = core
        self.spans = spans              # OpenTelemetry export (router/pipelines/otel.py), when configured
        self.door = door
        self.metrics = metrics
        self._now = clock
        self.manifests = manifests
        self.graphs = self.build_graphs(core.config)

    @staticmethod
    def build_graphs(config) -> dict[str, PipelineGraph]:
        return {name: PipelineGraph.build(name, cfg) for name, cfg in config.pipelines.items()}

    def apply(self, graphs: dict[str, PipelineGraph]) -> None:
        """Graphs of an applied config (built first: building may refuse it). Runs in
        progress keep the graph they started with."""
        self.graphs = graphs

    def _graph(self, name: str) -> PipelineGraph:
        graph = self.graphs.get(name)
        if graph is None:
            raise NotFound(f"unknown pipeline {quote(name)}; pipelines: {sorted(self.graphs)}", pipeline=name)
        return graph

    def _prepare(self, principal, request: mesh_pb2.RunRequest, remaining: float):
        graph = self._graph(request.pipeline)
        limits = self.core.config.server.limits
        request_id = wire.text("request_id", request.request_id, limits.max_id_chars)
        session = wire.text("session", request.session, limits.max_id_chars)
        size = sum(len(k) + len(v) for k, v in request.inputs.items())
        if size > limits.max_text_bytes:
            raise InvalidInput("inputs", f"{size} characters of input exceed the limit of {limits.max_text_bytes}",
                               pipeline=request.pipeline)
        if "text" in request.inputs and not request.inputs["text"].strip():
            raise InvalidInput("inputs.text", "must not be empty", pipeline=request.pipeline)
        now = self._now()
        # One admission (rate limit) per pipeline request; model rights for every node.
        for i, (node, cfg) in enumerate(graph.config.nodes.items()):
            self.door.gate.admit(principal, cfg.model, now) if i == 0 else \
                self.door.gate.check_model(principal, cfg.model)
        caller = NodeCaller(self.core, self.manifests, pipeline=request.pipeline,
                            latency_class=graph.config.latency_class, principal=principal,
                            request_id=request_id or uuid.uuid4().hex, session=session)
        return graph, caller, now + remaining

    async def run(self, principal, request: mesh_pb2.RunRequest, remaining: float, events=None,
                  stream: bool = False) -> mesh_pb2.RunResponse:
        graph, caller, deadline = self._prepare(principal, request, remaining)
        executor = PipelineExecutor(graph, caller, clock=self._now)
        started_ns = time.time_ns()
        status = "OK"
        try:
            outcome = await executor.run(dict(request.inputs), deadline, events=events, stream=stream)
        except MeshError as exc:
            status = exc.code.name
            raise
        finally:
            trace = executor.trace()
            trace.request_id = request.request_id
            self.metrics.observe(request.pipeline, status, trace.total_ms, trace.nodes,
                                 share_of_critical_path(trace))
            if self.spans is not None:
                self.spans.export(trace, started_ns, status)
        return self._response(request, graph, outcome, trace)

    def _response(self, request, graph, outcome, trace) -> mesh_pb2.RunResponse:
        config = self.core.config
        total = 0.0
        for n in trace.nodes:
            n.cost = price(config, n.model_used or n.model, n.compute_ms / 1000.0, n.input_tokens, n.output_tokens)
            total += n.cost
        trace.request_id = request.request_id
        return mesh_pb2.RunResponse(pipeline=request.pipeline, answer=str(outcome.answer or ""),
                                    outputs_json=json.dumps(_jsonable(outcome.outputs), default=str),
                                    trace=trace, cost=total, degraded=outcome.degraded)

    async def events(self, principal, request: mesh_pb2.RunRequest,
                     remaining: float) -> AsyncIterator["mesh_pb2.RunEvent | MeshError"]:
        """Node events and the output node's tokens as they happen, then the final
        answer; a failure is the last item (a MeshError), never raised mid-stream.
        Closing the iterator cancels the run."""
        queue: asyncio.Queue = asyncio.Queue()

        async def run() -> None:
            try:
                final = await self.run(principal, request, remaining, events=queue.put_nowait, stream=True)
                queue.put_nowait(mesh_pb2.RunEvent(final=final))
            except MeshError as exc:
                queue.put_nowait(exc)
            except Exception as exc:  # noqa: BLE001
                log.exception("pipeline stream failed")
                queue.put_nowait(Internal(f"internal error: {exc}", pipeline=request.pipeline))
            finally:
                queue.put_nowait(None)

        task = asyncio.create_task(run())
        try:
            while (item := await queue.get()) is not None:
                yield item
        finally:
            task.cancel()

    def describe(self, name: str) -> mesh_pb2.DescribeResponse:
        return self._graph(name).describe()


class PipelinesServicer(mesh_pb2_grpc.PipelinesServicer):
    """Thin: who is calling and until when, then the runner."""

    def __init__(self, runner: PipelineRunner) -> None:
        self.runner = runner
        self.door = runner.door
        self._default_s = runner.core.config.router.default_timeout_s

    @guarded
    async def Run(self, request, context):
        principal = self.door.principal(context)
        return await self.runner.run(principal, request, remaining_of(context, self._default_s))

    async def RunStream(self, request, context) -> AsyncIterator[mesh_pb2.RunEvent]:
        try:
            principal = self.door.principal(context)
        except MeshError as exc:
            await abort_with(context, exc)
            return
        events = self.runner.events(principal, request, remaining_of(context, self._default_s))
        try:
            async for item in events:
                if isinstance(item, MeshError):
                    await abort_with(context, item)
                    return
                yield item
        finally:
            await events.aclose()

    @guarded
    async def Describe(self, request, context):
        self.door.principal(context)
        return self.runner.describe(request.pipeline)
