"""Thin gRPC servicer of cmesh.v1.Autoscaler over the controller."""
from __future__ import annotations

import logging

from autoscaler.reports import validate_report
from cmesh.errors import InvalidInput, NotFound, Unavailable, abort_with
from cmesh.rpc import guarded
from protos import mesh_pb2, mesh_pb2_grpc

log = logging.getLogger(__name__)


class AutoscalerServicer(mesh_pb2_grpc.AutoscalerServicer):
    def __init__(self, controller, leading=None, live=None, rollouts=None) -> None:
        self.controller = controller
        self.leading = leading          # asyncio.Event set while this autoscaler leads
        self.live = live                # autoscaler.live.LiveConfig: applies and history
        self.rollouts = rollouts        # autoscaler.rollouts.RolloutDriver

    async def ReportLoad(self, request_iterator, context):
        # A standby keeps its window warm too, so it can decide at once when it takes over.
        async for report in request_iterator:
            try:
                validate_report(report, self.controller.config.models)   # the config in force now    # whole, before any of it reaches the window
            except InvalidInput as exc:
                log.warning("load report from %r refused: %s", report.source[:64], exc.message)
                await abort_with(context, exc)
            self.controller.on_report(report)
            if self.rollouts is not None:
                self.rollouts.on_report(report)
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
        self._require_leader()
        models = await self.controller.warm(model=request.model, pipeline=request.pipeline,
                                            reason=request.reason or "requested")
        return mesh_pb2.WarmResponse(models=models)

    @guarded
    async def Status(self, request, context):
        return self.controller.status(leader=self.leading is None or self.leading.is_set())

    @guarded
    async def ApplyConfig(self, request, context):
        self._require_leader()
        live = self._live()
        by = request.applied_by or "internal"
        if request.rollback:
            applied = await live.rollback(applied_by=by, dry_run=request.dry_run)
        else:
            source = request.source or "apply"
            if source not in ("apply", "sighup"):
                raise InvalidInput("source", f"must be 'apply' or 'sighup'; got {source[:32]!r}")
            applied = await live.apply(request.yaml, applied_by=by, source=source, dry_run=request.dry_run)
        return applied.to_proto(routers=self.controller.publisher.watchers)

    @guarded
    async def ConfigHistory(self, request, context):
        from autoscaler.live import record_proto

        live = self._live()
        if request.limit < 0:
            raise InvalidInput("limit", "must be >= 0")
        records = live.history.records(min(request.limit or 20, 1000))
        current = live.current
        return mesh_pb2.ConfigHistoryResponse(records=[record_proto(r) for r in records],
                                              current_id=current.id if current else "")

    @guarded
    async def RolloutStatus(self, request, context):
        if self.rollouts is None:
            return mesh_pb2.RolloutStatusResponse()
        return self.rollouts.status(request.model)

    def _live(self):
        if self.live is None:
            raise Unavailable("this autoscaler keeps no config history")
        return self.live

    def _require_leader(self) -> None:
        if self.leading is not None and not self.leading.is_set():
            raise Unavailable("this autoscaler is a standby; ask the leader")
