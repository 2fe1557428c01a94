"""Where each model's replicas are: a versioned table and the sources that fill it.

``StaticSource`` takes fixed lists from the config (the router alone, in front of
any OIP server). ``AutoscalerSource`` follows the autoscaler's WatchEndpoints
stream; while the autoscaler is unreachable the last table stays in force, so
serving never depends on the autoscaler being up. Reconnecting is bounded so a
restarted autoscaler is followed within about a second of being ready: the
channel's own reconnect back-off (``cmesh.backoff.RECONNECT_OPTIONS``, at most 1 s),
``wait_for_ready`` so the watch starts the moment the channel connects, and a
jittered exponential back-off of at most 1 s between failed watches.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from cmesh.backoff import RECONNECT_OPTIONS, Backoff
from cmesh.config import MeshConfig, TLSConfig
from cmesh.internal_auth import MeshCredentials, open_internal_channel
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
    kind: str = "mesh"                 # the backend adapter: "mesh" replica, "oip" server or "openai" API

    def serves(self, variant: str) -> bool:
        return not self.variants or variant in self.variants


class EndpointTable:
    """Mesh replicas (from the autoscaler or static config; versioned) plus the
    endpoints of external (oip, openai) backends (``set_external``); ``replicas`` is both."""

    def __init__(self) -> None:
        self.version = -1
        self._models: dict[str, tuple[ReplicaInfo, ...]] = {}
        self._external: dict[str, tuple[ReplicaInfo, ...]] = {}
        self._merged: dict[str, tuple[ReplicaInfo, ...]] = {}
        self._listeners: list[Callable[[set[str]], None]] = []

    def replicas(self, model: str) -> tuple[ReplicaInfo, ...]:
        return self._merged.get(model, ())

    def addresses(self) -> set[str]:
        return {r.address for reps in self._merged.values() for r in reps}

    def _merge(self) -> set[str]:
        merged = {m: self._models.get(m, ()) + self._external.get(m, ())
                  for m in set(self._models) | set(self._external)}
        changed = {m for m in set(merged) | set(self._merged) if merged.get(m) != self._merged.get(m)}
        self._merged = merged
        return changed

    def set_external(self, models: dict[str, tuple[ReplicaInfo, ...]]) -> None:
        """The endpoints of external backends (static, or as DNS last resolved)."""
        self._external = {m: tuple(r) for m, r in models.items() if r}
        changed = self._merge()
        if changed:
            for listener in self._listeners:
                listener(changed)

    def subscribe(self, listener: Callable[[set[str]], None]) -> None:
        """``listener(changed_models)`` runs after every replacement."""
        self._listeners.append(listener)

    def replace(self, version: int, models: dict[str, tuple[ReplicaInfo, ...]], *, force: bool = False) -> None:
        """``force``: the first table of a new watch stream, from a possibly new
        autoscaler whose versions need not continue the old one's."""
        if version <= self.version and not force:
            return                               # stale or repeated table
        self.version, self._models = version, dict(models)
        changed = self._merge()
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


def external_table(config: MeshConfig, resolved: dict[str, list[str]] | None = None
                   ) -> dict[str, tuple[ReplicaInfo, ...]]:
    """Endpoints of every external backend: an oip model's own (in the pool its mode
    implies) or its spill-over pool (serverless), an openai model's base URL (its one
    endpoint). ``resolved``: addresses per DNS name."""
    resolved = resolved or {}
    models = {}
    for name, model in config.models.items():
        if model.backend.kind == "openai":
            spec = model.backend
            pool = "serverless" if model.deployment.mode == "serverless" else "dedicated"
            models[name] = (ReplicaInfo(id=f"openai:{name}:{spec.base_url}", address=spec.base_url or "",
                                        pool=pool, kind="openai",
                                        max_inflight=spec.max_inflight_per_endpoint or 0),)
            continue
        if model.backend.kind == "oip":
            spec = model.backend
            pool = "serverless" if model.deployment.mode == "serverless" else "dedicated"
        elif model.backend.spill_over is not None:
            spec, pool = model.backend.spill_over, "serverless"
        else:
            continue
        addresses = spec.endpoints or resolved.get(spec.dns or "", [])
        models[name] = tuple(ReplicaInfo(id=f"oip:{name}:{a}", address=a, pool=pool, kind="oip",
                                         max_inflight=spec.max_inflight_per_endpoint or 0)
                             for a in addresses)
    return models


class ExternalSource:
    """Keeps the table's external endpoints: static ones once, DNS names re-resolved
    every ``dns_refresh_s`` (a name that fails to resolve keeps its last addresses)."""

    def __init__(self, config: MeshConfig, table: EndpointTable, resolve=None) -> None:
        from router.backends.oip import backend_specs, resolve as dns_resolve

        self.config = config
        self.table = table
        self._resolve = resolve or dns_resolve
        self._names = {spec.dns: spec.dns_refresh_s for spec in backend_specs(config).values() if spec.dns}
        self.resolved: dict[str, list[str]] = {}
        table.set_external(external_table(config))

    def apply(self, config: MeshConfig) -> None:
        from router.backends.oip import backend_specs

        self.config = config
        self._names = {spec.dns: spec.dns_refresh_s for spec in backend_specs(config).values() if spec.dns}
        self.table.set_external(external_table(config, self.resolved))

    async def refresh(self) -> None:
        for name in self._names:
            found = await self._resolve(name)
            if found:
                self.resolved[name] = found
            elif name not in self.resolved:
                log.warning("oip backend %s does not resolve (yet)", name)
        self.table.set_external(external_table(self.config, self.resolved))

    async def run(self) -> None:
        if not self._names:
            return
        period = min(self._names.values())
        while True:
            await self.refresh()
            await asyncio.sleep(period)        # the refresh period, not polling for work


class StaticSource:
    def __init__(self, config: MeshConfig, table: EndpointTable) -> None:
        self.table = table
        self.table.replace(0, static_table(config))

    def apply(self, config: MeshConfig) -> None:
        self.table.replace(self.table.version + 1, static_table(config))

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


def autoscaler_channel(address: str, credentials: MeshCredentials | None) -> grpc.aio.Channel:
    """The router's one channel to the autoscaler (endpoint watch, warm-ups, load
    reports): keepalive as for replicas, reconnect back-off bounded at 1 s."""
    from router.backends.base import CHANNEL_OPTIONS

    return open_internal_channel(address, credentials, [*CHANNEL_OPTIONS, *RECONNECT_OPTIONS])


class AutoscalerSource:
    """``credentials``: the mesh-internal token and client TLS (a bare TLSConfig:
    TLS only). ``backoff``, ``sleep`` and ``stub`` are injectable for tests."""

    def __init__(self, address: str, table: EndpointTable, router_id: str,
                 credentials: MeshCredentials | TLSConfig | None = None, *, backoff: Backoff | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, stub=None,
                 on_config: Callable[[mesh_pb2.ConfigRecord], Awaitable[None]] | None = None) -> None:
        self.on_config = on_config      # router.live: each applied config, before its table
        if not isinstance(credentials, MeshCredentials):
            credentials = MeshCredentials(credentials)
        self.address = address
        self.table = table
        self.router_id = router_id
        self.backoff = backoff or Backoff()
        self._sleep = sleep
        self.channel = autoscaler_channel(address, credentials)
        self.stub = stub or mesh_pb2_grpc.AutoscalerStub(self.channel)
        self.connected = asyncio.Event()
        self.watches = 0                          # watch streams opened (one per (re)connection)
        self._refused = False

    async def run(self) -> None:
        while True:
            refused = False
            try:
                self.watches += 1
                # wait_for_ready: while the autoscaler is down the call waits for the
                # channel to connect instead of failing, and starts the moment it does.
                call = self.stub.WatchEndpoints(mesh_pb2.WatchEndpointsRequest(
                    router_id=self.router_id, known_version=self.table.version), wait_for_ready=True)
                first = True
                async for msg in call:
                    self.connected.set()
                    self.backoff.reset()
                    if self.on_config is not None and msg.HasField("config"):
                        await self.on_config(msg.config)
                    self.table.replace(msg.version, table_from_proto(msg), force=first)
                    first = False
            except grpc.aio.AioRpcError as exc:
                refused = exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
                if refused and not self._refused:           # once per streak, not every second
                    log.error("autoscaler %s refused the router (%s: %s); serving on endpoint table v%d",
                              self.address, exc.code().name, exc.details(), self.table.version)
                elif self.connected.is_set():
                    log.warning("autoscaler %s unreachable (%s); serving on endpoint table v%d",
                                self.address, exc.code().name, self.table.version)
            self._refused = refused
            self.connected.clear()
            await self._sleep(self.backoff.next())    # reconnect back-off, not polling for work

    async def warm(self, model: str, pipeline: str = "", reason: str = "") -> None:
        try:
            await self.stub.Warm(mesh_pb2.WarmRequest(model=model, pipeline=pipeline, reason=reason), timeout=5)
        except grpc.aio.AioRpcError as exc:
            log.warning("cannot ask the autoscaler to warm %s: %s", model or pipeline, exc.code().name)

    async def close(self) -> None:
        await self.channel.close()
