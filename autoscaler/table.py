"""The versioned endpoint table the autoscaler publishes to routers."""
from __future__ import annotations

import asyncio
from collections.abc import Iterable

from autoscaler.providers.base import ReplicaHandle
from protos import mesh_pb2


def build_table(version: int, replicas: Iterable[ReplicaHandle], max_inflight: dict[str, int]
                ) -> mesh_pb2.EndpointTable:
    """Only ready replicas are routable: warming ones are not up yet and draining
    ones must receive no new work."""
    table = mesh_pb2.EndpointTable(version=version)
    by_model: dict[str, mesh_pb2.ModelEndpoints] = {}
    for r in sorted(replicas, key=lambda h: (h.model, h.id)):
        if r.state != "ready" or not r.address:
            continue
        entry = by_model.get(r.model)
        if entry is None:
            entry = by_model[r.model] = table.models.add(model=r.model)
        entry.replicas.add(id=r.id, address=r.address, pool=r.pool, state="ready",
                           max_inflight=max_inflight.get(r.model, 0), variants=list(r.variants))
    return table


class TablePublisher:
    """Holds the latest table; watchers wake on every new version (no polling)."""

    def __init__(self, first_version: int = 0) -> None:
        # Versions start from the wall clock in ms, so a restarted autoscaler's tables
        # are newer than anything a router kept from its predecessor.
        self.version = first_version
        self._published = False
        self.table = mesh_pb2.EndpointTable(version=first_version)
        self._changed = asyncio.Condition()
        self._key: bytes = b""
        self.config = mesh_pb2.ConfigRecord()   # the config in force, with its text
        self.watchers = 0

    async def set_config(self, record: mesh_pb2.ConfigRecord) -> None:
        """A newly applied config goes to every router with the next table, which
        is published now (same replicas, new version)."""
        async with self._changed:
            self.config = record
            if self._published:
                self.version += 1
                table = mesh_pb2.EndpointTable()
                table.CopyFrom(self.table)
                table.version = self.version
                self.table = table
            self._changed.notify_all()

    async def publish(self, replicas: Iterable[ReplicaHandle], max_inflight: dict[str, int]) -> bool:
        candidate = build_table(self.version + 1, replicas, max_inflight)
        key = b"".join(m.SerializeToString(deterministic=True) for m in candidate.models)
        if key == self._key and self._published:
            return False                        # nothing routable changed
        async with self._changed:
            self.version += 1
            candidate.version = self.version
            self.table, self._key, self._published = candidate, key, True
            self._changed.notify_all()
        return True

    async def watch(self, known_version: int = -1):
        """Tables newer than ``known_version``; nothing until a first table is
        published (a standby or a starting autoscaler must not blank routers)."""
        sent, sent_config = known_version, ""
        self.watchers += 1
        try:
            while True:
                async with self._changed:
                    await self._changed.wait_for(lambda: self._published and self.version != sent)
                    table, sent, config = self.table, self.version, self.config
                if config.id:
                    # The text once per change and watcher; the id alone after that.
                    out = mesh_pb2.EndpointTable()
                    out.CopyFrom(table)
                    if config.id != sent_config:
                        out.config.CopyFrom(config)
                    else:
                        out.config.id = config.id
                    table, sent_config = out, config.id
                yield table
        finally:
            self.watchers -= 1
