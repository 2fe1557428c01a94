"""Where each model's replicas are: a versioned table and the sources that fill it.

``StaticSource`` takes fixed lists from the config (the router alone, in front of
any OIP server). ``AutoscalerSource`` follows the autoscaler's WatchEndpoints
stream; while the autoscaler is unreachable the last table stays in force, so
serving never depends on the autoscaler being up.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from cmesh.config import MeshConfig, TLSConfig
from protos import mesh_pb2, mesh_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaInfo:
    id: str
    address: str
    pool: str = "serverless"           # "dedicated" or "serverless"
    state: str = "ready"               # "warming", "ready" or "draining"
    max_inflight: int = 0              # 0: the model's configured cap
    variants: tuple[str, ...] = ()     # empty: every variant

    def serves(self, variant: str) -> bool:
        return not self.variants or variant in self.variants


class EndpointTable:
    def __init__(self) -> None:
        self.version = -1
        self._models: dict[str, tuple[ReplicaInfo, ...]] = {}
        self._listeners: list[Callable[[set[str]], None]] = []

    def replicas(self, model: str) -> tuple[ReplicaInfo, ...]:
        return self._models.get(model, ())

    def addresses(self) -> set[str]:
        return {r.address for reps in self._models.values() for r in reps}

    def subscribe(self, listener: Callable[[set[str]], None]) -> None:
        """``listener(changed_models)`` runs after every replacement."""
        self._listeners.append(listener)

    def replace(self, version: int, models: dict[str, tuple[ReplicaInfo, ...]], *, force: bool = False) -> None:
        """``force``: the first table of a new watch stream, from a possibly new
        autoscaler whose versions need not continue the old one's."""
        if version <= self.version and not force:
            return                               # stale or repeated table
        changed = {m for m in set(models) | set(self._models) if models.get(m) != self._models.get(m)}
        self.version, self._models = version, dict(models)
        for listener in self._listeners:
            listener(changed)


def static_table(config: MeshConfig) -> dict[str, tuple[ReplicaInfo, ...]]:
    models = {}
    for name, model in config.models.items():
        replicas = [ReplicaInfo(id=addr, address=addr, pool=pool)
                    for pool, addrs in model.static_pools().items() for addr in addrs]
        if replicas:
            models[name] = tuple(replicas)
    return models


class StaticSource:
    def __init__(self, config: MeshConfig, table: EndpointTable) -> None:
        self.table = table
        self.table.replace(0, static_table(config))

    async def run(self) -> None:
        return None

    async def warm(self, model: str, pipeline: str = "", reason: str = "") -> None:
        return None                              # nobody to ask: static replicas are all there is

    async def close(self) -> None:
        return None


def table_from_proto(msg: mesh_pb2.EndpointTable) -> dict[str, tuple[ReplicaInfo, ...]]:
    return {m.model: tuple(ReplicaInfo(id=r.id or r.address, address=r.address, pool=r.pool or "serverless",
                                       state=r.state or "ready", max_inflight=r.max_inflight,
                                       variants=tuple(r.variants)) for r in m.replicas)
            for m in msg.models}


class AutoscalerSource:
    def __init__(self, address: str, table: EndpointTable, router_id: str,
                 tls: TLSConfig | None = None, retry_s: float = 1.0) -> None:
        from router.replica import open_channel

        self.address = address
        self.table = table
        self.router_id = router_id
        self.retry_s = retry_s
        self.channel = open_channel(address, tls)
        self.stub = mesh_pb2_grpc.AutoscalerStub(self.channel)
        self.connected = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                call = self.stub.WatchEndpoints(mesh_pb2.WatchEndpointsRequest(
                    router_id=self.router_id, known_version=self.table.version))
                first = True
                async for msg in call:
                    self.connected.set()
                    self.table.replace(msg.version, table_from_proto(msg), force=first)
                    first = False
            except grpc.aio.AioRpcError as exc:
                if self.connected.is_set():
                    log.warning("autoscaler %s unreachable (%s); serving on endpoint table v%d",
                                self.address, exc.code().name, self.table.version)
            self.connected.clear()
            await asyncio.sleep(self.retry_s)    # reconnect back-off, not polling for work

    async def warm(self, model: str, pipeline: str = "", reason: str = "") -> None:
        try:
            await self.stub.Warm(mesh_pb2.WarmRequest(model=model, pipeline=pipeline, reason=reason), timeout=5)
        except grpc.aio.AioRpcError as exc:
            log.warning("cannot ask the autoscaler to warm %s: %s", model or pipeline, exc.code().name)

    async def close(self) -> None:
        await self.channel.close()
