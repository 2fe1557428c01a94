"""Routers tell the autoscaler what each model's load is, once a second, over one
long-lived ReportLoad stream: queued and in-flight requests, arrivals since the
last report, and requests held for a first replica. Scaling is per model on that
model's own numbers. Each report also carries, per model:variant, the answers,
failures and latency histogram since the last one (``router.variant_stats``), as
extra entries with ``variant`` set, for the canary analysis; scaling reads only
the entries without a variant. A broken stream is reopened after a jittered
back-off of at most 1 s, waiting for the channel to connect (``wait_for_ready``)."""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import grpc

from cmesh.backoff import Backoff
from protos import mesh_pb2, mesh_pb2_grpc

log = logging.getLogger(__name__)


class LoadReporter:
    def __init__(self, core, channel: grpc.aio.Channel, source: str, interval_s: float = 1.0,
                 wall: Callable[[], float] = time.time, *, backoff: Backoff | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.core = core
        self.stub = mesh_pb2_grpc.AutoscalerStub(channel)
        self.source = source
        self.interval_s = interval_s
        self._wall = wall
        self.backoff = backoff or Backoff()
        self._sleep = sleep
        self._last_code: grpc.StatusCode | None = None

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
        for (model, variant), window in sorted(self.core.metering.stats.take().items()):
            spec = self.core.config.models.get(model)
            if spec is None or variant not in spec.variant_sources():
                continue                  # gone from the config since: the autoscaler would refuse it
            report.models.add(model=model, variant=variant, ready=True, answered=window.answered,
                              failed=window.failed, latency_counts=window.counts)
        return report

    async def run(self) -> None:
        while True:
            try:
                await self.stub.ReportLoad(self._reports(), wait_for_ready=True)
            except grpc.aio.AioRpcError as exc:
                # Refusals (a bad report, a wrong token) are configuration problems to see;
                # a dropped connection is routine while the autoscaler restarts.
                routine = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
                repeated = exc.code() == self._last_code
                self._last_code = exc.code()
                log.log(logging.DEBUG if routine or repeated else logging.WARNING,
                        "load reports to the autoscaler interrupted: %s: %s", exc.code().name, exc.details())
            await self._sleep(self.backoff.next())    # reconnect back-off

    async def _reports(self):
        written = 0
        while True:
            yield self.snapshot()
            written += 1
            if written > 1:                           # reports a period apart taken without a refusal:
                self.backoff.reset()                  # the stream works
            await self._sleep(self.interval_s)        # the reporting period itself
