"""Live configuration, the autoscaler's side: the one writer of the mesh's config.

An apply (``cmesh apply`` through a router's Admin service, SIGHUP, or the canary
driver) is validated whole, diffed against the config in force, recorded in the
history (``autoscaler.config_history``), followed by the controller and the
provider, and sent to every router with the next endpoint table. Routers take it
from that stream rather than from Redis: it is the authenticated, versioned
channel every router already holds, it works without Redis (the embedded
default), and a config and the replicas it implies arrive in order on it.
A config that fails validation is refused with every error and changes nothing.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from autoscaler.config_history import ConfigHistory, Record
from cmesh.config import MeshConfig
from cmesh.config_apply import parse_text, refusal, restart_only
from cmesh.config_diff import Change, diff_configs
from cmesh.errors import FailedPrecondition, InvalidInput
from cmesh.validation import ConfigError
from protos import mesh_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Applied:
    record: Record | None               # the config in force afterwards (None: a dry run)
    changes: list[Change] = field(default_factory=list)
    applied: bool = False

    def to_proto(self, routers: int = 0) -> mesh_pb2.ApplyConfigResponse:
        resp = mesh_pb2.ApplyConfigResponse(applied=self.applied, routers=routers)
        if self.record is not None:
            resp.record.CopyFrom(record_proto(self.record))
        for c in self.changes:
            after = c.after + (" (takes effect at restart)" if restart_only(c.path) else "")
            resp.changes.add(kind=c.kind, path=c.path, before=c.before, after=after)
        return resp


def record_proto(record: Record, text: str = "") -> mesh_pb2.ConfigRecord:
    return mesh_pb2.ConfigRecord(id=record.id, applied_at=record.applied_at, applied_by=record.applied_by,
                                 source=record.source, sha256=record.sha256, note=record.note, yaml=text)


# follow(config, snapshot path, record, its text) makes the services obey an applied config.
Follow = Callable[[MeshConfig, str, Record, str], Awaitable[None]]


class LiveConfig:
    def __init__(self, config: MeshConfig, history: ConfigHistory, follow: Follow,
                 overrides: Mapping[str, object] | None = None, mirror=None,
                 leading: Callable[[], bool] = lambda: True) -> None:
        self.config = config
        self.history = history
        self.mirror = mirror            # autoscaler.config_mirror.RedisConfigMirror, with Redis
        self._leading = leading         # only the leader writes the mirror
        self._follow = follow
        self.overrides = dict(overrides or {})
        self._lock = asyncio.Lock()

    @property
    def current(self) -> Record | None:
        return self.history.current()

    async def start(self, file_text: str, path: str) -> MeshConfig:
        """At start-up: the applied history goes on where it was, unless the file
        changed since it was last loaded (then the file is the newer intent)."""
        sha = hashlib.sha256(file_text.encode()).hexdigest()
        current = self.history.current()
        if current is not None and self.history.last_file_sha() == sha:
            try:
                config = parse_text(self.history.text(current.id), None, self.overrides)
                log.info("resuming applied config %s (%s by %s)", current.id, current.source, current.applied_by)
                await self._obey(config, current)
                return config
            except (ConfigError, OSError) as exc:
                log.warning("applied config %s no longer loads (%s); using %s", current.id, exc, path)
        record = self.history.record(file_text, applied_by="file", source="file", note=path)
        await self._obey(self.config, record)
        return self.config

    async def apply(self, text: str, *, applied_by: str, source: str = "apply", dry_run: bool = False,
                    note: str = "") -> Applied:
        async with self._lock:
            try:
                config = await asyncio.to_thread(parse_text, text, self.config, self.overrides)
            except ConfigError as exc:
                raise refusal(exc) from None
            changes = diff_configs(self.config, config)
            current = self.history.current()
            if dry_run:
                return Applied(current, changes, applied=False)
            if not changes and source not in ("rollback", "rollout"):
                return Applied(current, [], applied=False)     # the same config: nothing to record
            record = self.history.record(text, applied_by=applied_by, source=source, note=note)
            log.info("config %s applied by %s (%s): %d change(s)", record.id, applied_by, source, len(changes))
            await self._obey(config, record)
            return Applied(record, changes, applied=True)

    async def rollback(self, *, applied_by: str, dry_run: bool = False) -> Applied:
        target = self.history.rollback_target()
        if target is None:
            raise FailedPrecondition("no earlier config to roll back to")
        return await self.apply(self.history.text(target.id), applied_by=applied_by, source="rollback",
                                dry_run=dry_run, note=f"rollback to {target.id}")

    async def adopt_mirrored(self) -> Applied | None:
        """On election: take the config the previous leader applied when it is newer
        than the one in force here (an apply must survive a fail-over; a file this
        autoscaler loaded later is the newer intent). Else mirror ours."""
        if self.mirror is None:
            return None
        body = await self.mirror.latest()
        current = self.history.current()
        try:
            mirrored_at = float((body or {}).get("applied_at") or 0)
        except (TypeError, ValueError):
            mirrored_at = 0.0                  # unreadable: not newer than anything
        newer = body is not None and (current is None or (
            body.get("sha256") != current.sha256 and mirrored_at > current.applied_at))
        if not newer:
            if current is not None and (body is None or body.get("sha256") != current.sha256):
                await self.mirror.publish(current, self.history.text(current.id))
            return None
        log.info("adopting config %s (%s by %s) from the previous leader", body.get("id"), body.get("source"),
                 body.get("applied_by"))
        source = body.get("source") if body.get("source") in ("apply", "sighup", "rollback", "rollout") else "apply"
        try:
            return await self.apply(body["yaml"], applied_by=str(body.get("applied_by", ""))[:128], source=source,
                                    note=f"adopted from the previous leader ({str(body.get('id'))[:32]})")
        except InvalidInput as exc:
            log.error("the mirrored config does not load here: %s", exc.message)
            return None

    async def reload_file(self, path: str | Path) -> Applied | None:
        """SIGHUP: apply the config file again, as an operator would."""
        try:
            text = Path(path).read_text()
            return await self.apply(text, applied_by="sighup", source="sighup", note=str(path))
        except (OSError, InvalidInput) as exc:
            log.error("SIGHUP: %s not applied: %s", path, getattr(exc, "message", exc))
            return None

    async def _obey(self, config: MeshConfig, record: Record) -> None:
        self.config = config
        text = self.history.text(record.id)          # read once: for the routers and the mirror
        await self._follow(config, str(self.history.path(record.id)), record, text)
        if self.mirror is not None and self._leading():
            await self.mirror.publish(record, text)
