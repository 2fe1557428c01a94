"""Live configuration, the router's side: follow the configs the autoscaler applies.

Each config arrives in the autoscaler's endpoint table stream (``autoscaler.live``
says why there and not Redis), is parsed off the event loop with this router's
own flags on top, and swapped into every part at once (``RouterServer.apply``):
nothing is rebuilt that holds state. A router with static endpoints has no
autoscaler to follow: SIGHUP reloads its file.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Mapping

from cmesh.config import MeshConfig
from cmesh.config_apply import parse_text
from cmesh.validation import ConfigError
from protos import mesh_pb2

log = logging.getLogger(__name__)


class ConfigFollower:
    """``apply(config)`` swaps a config into the router; it must not fail for a
    config that parsed (``RouterServer.apply`` prepares what can fail first)."""

    def __init__(self, apply: Callable[[MeshConfig], None], overrides: Mapping[str, object],
                 file_text: str = "") -> None:
        self._apply = apply
        self.overrides = dict(overrides)
        self.config_id = ""
        self.file_sha = hashlib.sha256(file_text.encode()).hexdigest() if file_text else ""
        self.refused: dict[str, str] = {}          # config id -> why this router could not follow it
        self._changed = asyncio.Condition()

    async def on_record(self, record: mesh_pb2.ConfigRecord) -> None:
        """A table's config: new text is parsed and applied; an id alone (the text
        came earlier) or the config already in force does nothing."""
        if not record.id or record.id == self.config_id or not record.yaml:
            return
        if not self.config_id and record.sha256 == self.file_sha:
            await self._settle(record.id)            # the autoscaler runs this router's own file
            return
        try:
            config = await asyncio.to_thread(parse_text, record.yaml, None, self.overrides)
            self._apply(config)
        except (ConfigError, ValueError) as exc:
            # Validated by the autoscaler, so only this router's flags can make it fail.
            self.refused[record.id] = str(exc)
            log.error("cannot follow config %s: %s", record.id, exc)
            return
        log.info("following config %s (%s by %s)", record.id, record.source, record.applied_by)
        await self._settle(record.id)

    async def wait_for(self, config_id: str, timeout_s: float) -> bool:
        """True once this router follows ``config_id`` (False: not within the time)."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(
                    lambda: self.config_id == config_id or config_id in self.refused), timeout_s)
            except TimeoutError:
                return False
        return self.config_id == config_id

    async def _settle(self, config_id: str) -> None:
        async with self._changed:
            self.config_id = config_id
            self._changed.notify_all()
