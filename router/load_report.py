"""Routers tell the autoscaler what each model's load is, once a second, over one
long-lived ReportLoad stream: queued and in-flight requests, arrivals since the
last report, and requests held for a first replica. Scaling is per model on that
model's own numbers."""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

import grpc

from protos import mesh_pb2, mesh_pb2_grpc

log = logging.getLogger(__name__)


class LoadReporter:
    def __init__(self, core, channel: grpc.aio.Channel, source: str, interval_s: float = 1.0,
                 wall: Callable[[], float] = time.time) -> None:
        self.core = core
        self.stub = mesh_pb2_grpc.AutoscalerStub(channel)
        self.source = source
        self.interval_s = interval_s
        self._wall = wall

    def snapshot(self) -> mesh_pb2.LoadReport:
        report = mesh_pb2.LoadReport(source=self.source, timestamp_ms=int(self._wall() * 1000))
        arrivals: Counter = self.core.take_arrivals()
        for model in self.core.config.models:
            dispatcher = self.core.dispatchers.get(model)
            queued = len(dispatcher.queue) if dispatcher else 0
            in_flight = sum(dispatcher.in_flight.values()) if dispatcher else 0
            report.models.add(model=model, queue_depth=queued, in_flight=in_flight,
                              arrivals=arrivals.get(model, 0), ready=True)
            if dispatcher is not None and dispatcher.holding:
                report.held[model] = queued
        return report

    async def run(self) -> None:
        while True:
            try:
                await self.stub.ReportLoad(self._reports())
            except grpc.aio.AioRpcError as exc:
                log.debug("load reports to the autoscaler interrupted: %s", exc.code().name)
            await asyncio.sleep(self.interval_s)      # reconnect back-off

    async def _reports(self):
        while True:
            yield self.snapshot()
            await asyncio.sleep(self.interval_s)     # the reporting period itself
