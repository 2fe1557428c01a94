"""The I/O half of the readiness probe: ask every ready replica, act on the verdict.

Every ``readiness_probe.period_s`` the monitor sends OIP ``ModelReady`` for each
model and variant of every ready replica (with the mesh-internal credentials),
hands the outcomes to the pure ``autoscaler.readiness.judge`` and asks the
provider to replace the replicas it condemns: the provider drains one (out of
the endpoint table first, so routers stop sending) and the control loop starts
its successor on its next tick, as for any replica that went away.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import grpc

from autoscaler.providers.base import ReplicaHandle
from autoscaler.readiness import ProbeOutcome, ProbeRecord, judge
from cmesh.config import ReadinessProbeConfig
from cmesh.internal_auth import MeshCredentials, open_internal_channel
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class ReplicaProber:
    """``ModelReady`` for every model/variant of a replica, over one cached channel per address."""

    def __init__(self, credentials: MeshCredentials | None, timeout_s: float) -> None:
        self.credentials = credentials
        self.timeout_s = timeout_s
        self._channels: dict[str, tuple[grpc.aio.Channel, pb_grpc.GRPCInferenceServiceStub]] = {}

    def _stub(self, address: str) -> pb_grpc.GRPCInferenceServiceStub:
        entry = self._channels.get(address)
        if entry is None:
            channel = open_internal_channel(address, self.credentials)
            entry = self._channels[address] = (channel, pb_grpc.GRPCInferenceServiceStub(channel))
        return entry[1]

    async def probe(self, handle: ReplicaHandle) -> ProbeOutcome:
        stub = self._stub(handle.address or "")
        versions = handle.variants or ("",)
        try:
            replies = await asyncio.gather(*(
                stub.ModelReady(pb.ModelReadyRequest(name=handle.model, version=v), timeout=self.timeout_s)
                for v in versions))
        except grpc.aio.AioRpcError as exc:
            return ProbeOutcome(False, f"ModelReady: {exc.code().name}: {exc.details() or ''}".rstrip(": "))
        missing = [f"{handle.model}:{v or 'default'}" for v, r in zip(versions, replies) if not r.ready]
        return ProbeOutcome(False, f"{', '.join(missing)} not ready") if missing else ProbeOutcome(True)

    async def forget(self, keep: set[str]) -> None:
        """Close channels to addresses no longer probed."""
        for address in [a for a in self._channels if a not in keep]:
            channel, _ = self._channels.pop(address)
            await channel.close()

    async def close(self) -> None:
        await self.forget(set())


class ReadinessMonitor:
    """Probe, judge, replace; ``step()`` is one round (tests drive it directly)."""

    def __init__(self, provider, prober, cfg: ReadinessProbeConfig, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.provider = provider              # replicas() and replace(handle, reason)
        self.prober = prober                  # probe(handle) -> ProbeOutcome
        self.cfg = cfg
        self._now = clock
        self._sleep = sleep
        self.records: dict[str, ProbeRecord] = {}

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.step()
                except Exception:  # noqa: BLE001 - one bad round must not end the probing
                    log.exception("readiness probe round failed")
                await self._sleep(self.cfg.period_s)
        finally:
            await self.prober.close()

    async def step(self) -> list[str]:
        """One round over every ready replica; returns the ids it replaced."""
        ready = [r for r in self.provider.replicas() if r.state == "ready" and r.address]
        outcomes = await asyncio.gather(*(self.prober.probe(r) for r in ready))
        now = self._now()
        replaced = []
        for handle, outcome in zip(ready, outcomes):
            record, verdict = judge(self.records.get(handle.id, ProbeRecord()), outcome, now, self.cfg)
            self.records[handle.id] = record
            if not outcome.ok:
                log.info("replica %s of %s: readiness probe %d/%d failed: %s", handle.id, handle.model,
                         record.failures, self.cfg.failure_threshold, outcome.reason)
            if verdict.replace and handle.state == "ready":
                log.warning("replica %s of %s %s: replacing it", handle.id, handle.model, verdict.reason)
                await self.provider.replace(handle, verdict.reason)
                replaced.append(handle.id)
        probed = {r.id for r in ready}
        for rid in [rid for rid in self.records if rid not in probed]:
            del self.records[rid]               # gone, draining or replaced
        await self.prober.forget({r.address for r in ready if r.address})
        return replaced
