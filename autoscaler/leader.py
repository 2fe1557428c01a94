"""Leader election: one autoscaler acts, standbys wait, through a lease in Redis.

Only the leader starts and stops replicas; two autoscalers acting at once would
fight over pool sizes. The lease is one Redis key holding the leader's id with
a TTL (``SET key id NX PX ttl``). The leader extends it every ``ttl/3``; a
standby tries to take it every ``ttl/3``. If the leader dies (or is cut off
from Redis) the key expires and a standby takes over within about
``ttl + ttl/3``.

Renew and release are Lua scripts that act only while the key still holds our
id, so a leader that lost the lease (paused past its TTL, say) cannot extend or
delete its successor's lease.

The leader also keeps a local deadline: the lease counts as held only until
``ttl`` after the *start* of the last successful renew, measured on the
injected monotonic clock. Redis expires the key no earlier than that, so
``is_leader`` turns False before a standby can win, even when Redis is
unreachable and no renew can say so. The control loop checks ``is_leader``
before each action.

The heartbeat sleeps ``ttl/3`` between renewals: that is the lease protocol's
period, not a poll for work.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Protocol

import redis
import redis.asyncio as aredis

log = logging.getLogger("cmesh.autoscaler.leader")

DEFAULT_KEY = "cmesh:autoscaler:leader"

# KEYS[1] lease key; ARGV[1] our id; ARGV[2] ttl in ms.
RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS[1] lease key; ARGV[1] our id.
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

Callback = Callable[[], "Awaitable[None] | None"]


def default_holder_id() -> str:
    """Unique per process: host, pid and a random suffix (pids repeat across containers)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease(Protocol):
    holder_id: str

    @property
    def is_leader(self) -> bool: ...

    async def try_acquire(self) -> bool: ...

    async def renew(self) -> bool: ...

    async def release(self) -> bool: ...

    async def run(self, on_elected: Callback, on_lost: Callback) -> None: ...

    async def close(self) -> None: ...


class LeaderLease:
    """A lease in Redis at ``key``, held under ``holder_id`` for ``ttl_s``."""

    def __init__(self, redis_url: str, *, holder_id: str | None = None, ttl_s: float = 5.0,
                 key: str = DEFAULT_KEY, clock: Callable[[], float] = time.monotonic,
                 client: aredis.Redis | None = None) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s: must be > 0")
        self.key = key
        self.holder_id = holder_id or default_holder_id()
        self.ttl_s = ttl_s
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._clock = clock
        self._owns_client = client is None
        # Commands time out within one TTL: a hung Redis must not stall the
        # heartbeat past the point where the lease is lost anyway.
        self._redis = client or aredis.Redis.from_url(
            redis_url, decode_responses=True, socket_timeout=ttl_s, socket_connect_timeout=ttl_s)
        self._renew = self._redis.register_script(RENEW_LUA)
        self._release = self._redis.register_script(RELEASE_LUA)
        self._valid_until: float | None = None

    @property
    def is_leader(self) -> bool:
        return self._valid_until is not None and self._clock() < self._valid_until

    async def try_acquire(self) -> bool:
        """Take the lease if nobody holds it (or we already do)."""
        started = self._clock()
        if await self._redis.set(self.key, self.holder_id, nx=True, px=self._ttl_ms):
            self._valid_until = started + self.ttl_s
            return True
        return await self.renew()            # ours already (e.g. a reconnect): extend it

    async def renew(self) -> bool:
        """Extend the lease; False (and no longer leader) if it is not ours any more."""
        started = self._clock()
        if await self._renew(keys=[self.key], args=[self.holder_id, self._ttl_ms]):
            self._valid_until = started + self.ttl_s
            return True
        self._valid_until = None
        return False

    async def release(self) -> bool:
        """Give the lease up now (clean shutdown), so a standby need not wait for the TTL."""
        self._valid_until = None
        return bool(await self._release(keys=[self.key], args=[self.holder_id]))

    async def holder(self) -> str | None:
        """Who holds the lease now (for Status and tests)."""
        return await self._redis.get(self.key)

    async def run(self, on_elected: Callback, on_lost: Callback) -> None:
        """Heartbeat until cancelled: renew while leading, try to acquire while not.

        ``on_elected`` / ``on_lost`` (plain or async) run on each transition.
        Cancelling does *not* release the lease (a cancelled task looks like a
        dead process to the others); call ``release()`` after cancelling for a
        clean hand-over."""
        interval = self.ttl_s / 3
        leading = False
        while True:
            try:
                ok = await (self.renew() if leading else self.try_acquire())
            except (redis.RedisError, OSError) as exc:
                # Unreachable Redis: we keep leading only until our own lease
                # would have expired; nobody else can win before that.
                ok = self.is_leader
                log.warning("leader lease %s: Redis error (%s: %s); %s", self.key, type(exc).__name__,
                            exc, "still leading until the lease expires" if ok else "not leading")
            if ok and not leading:
                leading = True
                log.info("leader lease %s: %s is the leader", self.key, self.holder_id)
                try:
                    await _call(on_elected)
                except Exception:
                    # A leader that cannot start leading must not sit on the lease.
                    await _quietly(self.release())
                    raise
            elif not ok and leading:
                leading = False
                log.warning("leader lease %s: %s lost the lease", self.key, self.holder_id)
                await _call(on_lost)
            delay = interval
            if leading and self._valid_until is not None:
                # Wake in time to notice our own deadline even if Redis stays silent.
                delay = max(0.0, min(interval, self._valid_until - self._clock()))
            await asyncio.sleep(delay)

    async def close(self) -> None:
        if self._owns_client:
            await self._redis.aclose()


class LocalLease:
    """No Redis configured: a single autoscaler, always the leader."""

    def __init__(self, holder_id: str | None = None) -> None:
        self.holder_id = holder_id or default_holder_id()

    @property
    def is_leader(self) -> bool:
        return True

    async def try_acquire(self) -> bool:
        return True

    async def renew(self) -> bool:
        return True

    async def release(self) -> bool:
        return True

    async def run(self, on_elected: Callback, on_lost: Callback) -> None:
        await _call(on_elected)
        await asyncio.Event().wait()         # leads until cancelled

    async def close(self) -> None:
        return None


def make_lease(redis_url: str | None, *, holder_id: str | None = None, ttl_s: float = 5.0,
               key: str = DEFAULT_KEY, clock: Callable[[], float] = time.monotonic) -> LeaderLease | LocalLease:
    """A Redis lease when Redis is configured, else the always-leader local one."""
    if redis_url:
        return LeaderLease(redis_url, holder_id=holder_id, ttl_s=ttl_s, key=key, clock=clock)
    return LocalLease(holder_id)


async def _call(callback: Callback) -> None:
    result = callback()
    if inspect.isawaitable(result):
        await result


async def _quietly(aw: Awaitable[object]) -> None:
    try:
        await aw
    except (redis.RedisError, OSError) as exc:
        log.warning("leader lease: release failed (%s); the lease expires by its TTL", exc)
