"""Thin gRPC servicer of cmesh.v1.Autoscaler over the controller."""
from __future__ import annotations

import logging

from autoscaler.reports import validate_report
from cmesh.errors import InvalidInput, NotFound, abort_with
from cmesh.rpc import guarded
from protos import mesh_pb2, mesh_pb2_grpc

log = logging.getLogger(__name__)


class AutoscalerServicer(mesh_pb2_grpc.AutoscalerServicer):
    def __init__(self, controller, leading=None) -> None:
        self.controller = controller
        self.leading = leading          # asyncio.Event set while this autoscaler leads

    async def ReportLoad(self, request_iterator, context):
        # A standby keeps its window warm too, so it can decide at once when it takes over.
        models = self.controller.config.models
        async for report in request_iterator:
            try:
                validate_report(report, models)    # whole, before any of it reaches the window
            except InvalidInput as exc:
                log.warning("load report from %r refused: %s", report.source[:64], exc.message)
                await abort_with(context, exc)
            self.controller.on_report(report)
        return mesh_pb2.ReportLoadAck()

    async def WatchEndpoints(self, request, context):
        async for table in self.controller.publisher.watch(request.known_version):
            yield table

    @guarded
    async def Warm(self, request, context):
        config = self.controller.config
        if bool(request.model) == bool(request.pipeline):
            raise InvalidInput("model", "give exactly one of model or pipeline")
        if request.model and request.model not in config.models:
            raise NotFound(f"unknown model {request.model!r}", component=request.model)
        if request.pipeline and request.pipeline not in config.pipelines:
            raise NotFound(f"unknown pipeline {request.pipeline!r}", pipeline=request.pipeline)
        if self.leading is not None and not self.leading.is_set():
            from cmesh.errors import Unavailable

            raise Unavailable("this autoscaler is a standby; ask the leader")
        models = await self.controller.warm(model=request.model, pipeline=request.pipeline,
                                            reason=request.reason or "requested")
        return mesh_pb2.WarmResponse(models=models)

    @guarded
    async def Status(self, request, context):
        return self.controller.status(leader=self.leading is None or self.leading.is_set())
