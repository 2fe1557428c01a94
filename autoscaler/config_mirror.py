"""The config in force, mirrored in Redis for the next leader.

Each autoscaler keeps its own history on disk (``autoscaler.config_history``); with
Redis (and so leader election) the leader also writes every config it applies
here, and an autoscaler that is elected adopts the mirrored config when it is not
the one it has, so an apply survives a fail-over. Only the latest config is kept:
history stays per process.
"""
from __future__ import annotations

import json
import logging

import redis.asyncio as aredis
from redis.exceptions import RedisError

from autoscaler.config_history import Record

log = logging.getLogger(__name__)
KEY = "cmesh:config:current"


class RedisConfigMirror:
    def __init__(self, url: str, *, key: str = KEY, timeout_s: float = 2.0,
                 client: aredis.Redis | None = None) -> None:
        self.key = key
        self._owns = client is None
        self._redis = client or aredis.Redis.from_url(url, decode_responses=True, socket_timeout=timeout_s,
                                                      socket_connect_timeout=timeout_s)

    async def publish(self, record: Record, text: str) -> bool:
        """False (logged) when Redis is away: the apply holds here; the next one retries."""
        body = {"id": record.id, "applied_at": record.applied_at, "applied_by": record.applied_by,
                "source": record.source, "sha256": record.sha256, "note": record.note, "yaml": text}
        try:
            await self._redis.set(self.key, json.dumps(body))
            return True
        except (RedisError, OSError) as exc:
            log.error("config %s not mirrored to Redis (%s): a new leader would not know it", record.id, exc)
            return False

    async def latest(self) -> dict | None:
        try:
            raw = await self._redis.get(self.key)
        except (RedisError, OSError) as exc:
            log.error("cannot read the mirrored config from Redis (%s)", exc)
            return None
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            return None
        return body if isinstance(body, dict) and isinstance(body.get("yaml"), str) else None

    async def close(self) -> None:
        if self._owns:
            await self._redis.aclose()
