"""Exactly-once metering of requests by tenant, pipeline, model, variant and class.

The router records one ``MeterEvent`` per request it answers (DESIGN.md §5). A
retried request carries the same request id, so ``record`` is idempotent on it:
the first call counts, every later one returns False. Two stores share one
``Meter`` interface:

* ``MemoryMeter`` — a single-machine mesh without Redis;
* ``RedisMeter``  — any number of routers sharing Redis; one Lua script does the
  dedupe, the increments and the event append atomically (DESIGN.md §4 State).
  ``make_meter`` wraps it in ``router.meter_spool.SpooledMeter``, which keeps events
  through a Redis outage and replays them, exactly once by request id, when it returns.

Compute time is aggregated as integer nanoseconds in both stores. Floats added
in different orders (or by Redis' long-double HINCRBYFLOAT, which also keeps a
string of up to 17 digits) drift apart; integers do not, so the two stores give
bit-identical reports for the same events. Nanoseconds rather than microseconds
because a small model's per-request share of a batch can be well under 1 µs.
int64 nanoseconds hold 292 years of compute per row.

The meter never reads a clock: the caller passes the event's wall-clock
timestamp, and ``MemoryMeter`` ages out remembered ids against it.
"""
from __future__ import annotations

import json
from collections import OrderedDict, deque
from dataclasses import dataclass, fields
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aredis

from cmesh.errors import Internal, Unavailable

NS_PER_S = 1_000_000_000
DIMENSIONS = ("tenant", "pipeline", "model", "variant", "latency_class", "status")
DEFAULT_EVENTS_PAGE = 1000


def to_ns(seconds: float) -> int:
    return round(seconds * NS_PER_S)


@dataclass(frozen=True)
class MeterEvent:
    """One answered request, as the router meters it."""

    request_id: str
    tenant: str
    pipeline: str          # "" when the call is not part of a pipeline
    model: str
    variant: str
    latency_class: str
    status: str            # gRPC status code name; "OK" for success
    input_tokens: int
    output_tokens: int
    compute_s: float       # the model server's report: this request's share of its batches
    timestamp: float       # wall-clock epoch seconds, from the caller
    external: bool = False  # answered by an external backend: compute_s is its wall time unless reported

    def __post_init__(self) -> None:
        # A bad event would poison an aggregate forever; refuse it at the door.
        if not self.request_id:
            raise ValueError("request_id: must not be empty")
        if not self.model:
            raise ValueError("model: must not be empty")
        if not self.status:
            raise ValueError("status: must not be empty (use 'OK' for success)")
        for name in ("input_tokens", "output_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0")
        if not self.compute_s >= 0:           # also rejects NaN
            raise ValueError("compute_s: must be >= 0")

    def key(self) -> tuple[str, ...]:
        return tuple(getattr(self, d) for d in DIMENSIONS)

    @property
    def compute_ns(self) -> int:
        return to_ns(self.compute_s)


@dataclass(frozen=True)
class MeterRow:
    """Aggregate of every counted event with the same (tenant … status) tuple."""

    tenant: str
    pipeline: str
    model: str
    variant: str
    latency_class: str
    status: str
    requests: int
    input_tokens: int
    output_tokens: int
    compute_ns: int
    external_compute_ns: int = 0    # of compute_ns: on external (oip) backends

    @property
    def compute_s(self) -> float:
        return self.compute_ns / NS_PER_S

    @property
    def external_compute_s(self) -> float:
        return self.external_compute_ns / NS_PER_S

    def key(self) -> tuple[str, ...]:
        return tuple(getattr(self, d) for d in DIMENSIONS)


@dataclass(frozen=True)
class StoredEvent:
    """An event as read back for reconciliation; ``id`` pages ``events(since_id=...)``."""

    id: str
    event: MeterEvent


@runtime_checkable
class Meter(Protocol):
    async def record(self, event: MeterEvent) -> bool:
        """Count ``event`` unless its request id was already metered; True if counted."""

    async def rows(self) -> list[MeterRow]:
        """Every aggregate row, sorted by its key tuple."""

    async def events(self, since_id: str | None = None,
                     count: int = DEFAULT_EVENTS_PAGE) -> list[StoredEvent]:
        """Counted events after ``since_id`` (exclusive), oldest first, at most ``count``."""

    async def close(self) -> None: ...


COUNTERS = ("requests", "input_tokens", "output_tokens", "compute_ns", "external_compute_ns")


def _new_row() -> dict[str, int]:
    return dict.fromkeys(COUNTERS, 0)


def _row_of(key: tuple[str, ...], counts: dict[str, int]) -> MeterRow:
    return MeterRow(*key, requests=counts["requests"], input_tokens=counts["input_tokens"],
                    output_tokens=counts["output_tokens"], compute_ns=counts["compute_ns"],
                    external_compute_ns=counts.get("external_compute_ns", 0))


class MemoryMeter:
    """In-process meter for a single-machine mesh.

    Seen ids are kept for ``dedupe_ttl_s`` of event time and at most ``max_seen``
    of them, so memory stays bounded; the event log keeps the last
    ``stream_maxlen`` events, like the Redis stream. ``record`` never awaits, so
    concurrent calls on one event loop cannot interleave.
    """

    def __init__(self, *, dedupe_ttl_s: float = 86400, max_seen: int = 1_000_000,
                 stream_maxlen: int = 100_000) -> None:
        if dedupe_ttl_s <= 0:
            raise ValueError("dedupe_ttl_s: must be > 0")
        if max_seen < 1 or stream_maxlen < 1:
            raise ValueError("max_seen and stream_maxlen: must be >= 1")
        self.dedupe_ttl_s = dedupe_ttl_s
        self.max_seen = max_seen
        self._seen: OrderedDict[str, float] = OrderedDict()    # id -> event time, oldest first
        self._rows: dict[tuple[str, ...], dict[str, int]] = {}
        self._events: deque[StoredEvent] = deque(maxlen=stream_maxlen)
        self._seq = 0

    def _forget_old(self, now: float) -> None:
        # Insertion order is close to time order; stop at the first id still fresh.
        horizon = now - self.dedupe_ttl_s
        while self._seen:
            oldest_id, seen_at = next(iter(self._seen.items()))
            if seen_at > horizon and len(self._seen) < self.max_seen:
                break
            del self._seen[oldest_id]

    async def record(self, event: MeterEvent) -> bool:
        self._forget_old(event.timestamp)
        if event.request_id in self._seen:
            return False
        self._seen[event.request_id] = event.timestamp
        counts = self._rows.setdefault(event.key(), _new_row())
        counts["requests"] += 1
        counts["input_tokens"] += event.input_tokens
        counts["output_tokens"] += event.output_tokens
        counts["compute_ns"] += event.compute_ns
        if event.external:
            counts["external_compute_ns"] += event.compute_ns
        self._seq += 1
        self._events.append(StoredEvent(f"{self._seq}-0", event))
        return True

    async def rows(self) -> list[MeterRow]:
        return [_row_of(key, counts) for key, counts in sorted(self._rows.items())]

    async def events(self, since_id: str | None = None,
                     count: int = DEFAULT_EVENTS_PAGE) -> list[StoredEvent]:
        after = 0 if since_id is None else int(since_id.split("-", 1)[0])
        return [e for e in self._events if int(e.id.split("-", 1)[0]) > after][:count]

    async def close(self) -> None:
        return None


# KEYS: 1 seen:<request id>  2 row:<encoded tuple>  3 rows index  4 event stream
# ARGV: 1 dedupe ttl (s)  2 stream maxlen  3 input tokens  4 output tokens
#       5 compute ns  6 external compute ns  7.. event field/value pairs for XADD
# Integers travel as strings and only HINCRBY parses them (int64): Lua numbers are
# doubles and would round nanosecond totals past 2^53.
RECORD_LUA = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return 0
end
redis.call('HINCRBY', KEYS[2], 'requests', 1)
redis.call('HINCRBY', KEYS[2], 'input_tokens', ARGV[3])
redis.call('HINCRBY', KEYS[2], 'output_tokens', ARGV[4])
redis.call('HINCRBY', KEYS[2], 'compute_ns', ARGV[5])
if ARGV[6] ~= '0' then
  redis.call('HINCRBY', KEYS[2], 'external_compute_ns', ARGV[6])
end
redis.call('SADD', KEYS[3], KEYS[2])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 7))
return 1
"""


def encode_key(key: tuple[str, ...]) -> str:
    """A compact JSON array: unambiguous whatever ':' '|' or quotes the fields hold,
    and deterministic, so one tuple always maps to one Redis key."""
    return json.dumps(list(key), separators=(",", ":"), ensure_ascii=True)


def decode_key(encoded: str) -> tuple[str, ...]:
    value = json.loads(encoded)
    if not (isinstance(value, list) and len(value) == len(DIMENSIONS)
            and all(isinstance(v, str) for v in value)):
        raise ValueError(f"not a metering row key: {encoded!r}")
    return tuple(value)


def event_fields(event: MeterEvent) -> dict[str, str]:
    out = {f.name: str(getattr(event, f.name)) for f in fields(event)
           if f.name not in ("compute_s", "timestamp", "external")}
    out["compute_ns"] = str(event.compute_ns)
    if event.external:
        out["external"] = "1"
    out["timestamp"] = repr(float(event.timestamp))       # repr: round-trips exactly
    return out


def event_from_fields(data: dict[str, str]) -> MeterEvent:
    return MeterEvent(
        request_id=data["request_id"], tenant=data["tenant"], pipeline=data["pipeline"],
        model=data["model"], variant=data["variant"], latency_class=data["latency_class"],
        status=data["status"], input_tokens=int(data["input_tokens"]),
        output_tokens=int(data["output_tokens"]),
        compute_s=int(data["compute_ns"]) / NS_PER_S, timestamp=float(data["timestamp"]),
        external=data.get("external") == "1")


def redact_url(url: str) -> str:
    """The URL without its password, fit for an error message."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))


class RedisMeter:
    """Meter shared by every router through Redis (``redis.asyncio``).

    Keys (``prefix`` defaults to ``cmesh:meter``):
      ``<prefix>:seen:<request id>``   "1", expires after ``dedupe_ttl_s``
      ``<prefix>:row:<json tuple>``    hash: requests, input_tokens, output_tokens, compute_ns,
                                       external_compute_ns (when any)
      ``<prefix>:rows``                set of row keys
      ``<prefix>:events``              stream of counted events, trimmed to ~``stream_maxlen``
    For Redis Cluster give a hash-tagged prefix such as ``{cmesh:meter}`` so the
    script's four keys share a slot.
    """

    def __init__(self, url: str, prefix: str = "cmesh:meter", dedupe_ttl_s: int = 86400,
                 stream_maxlen: int = 100_000, *, timeout_s: float = 5.0,
                 max_connections: int = 32) -> None:
        if not prefix:
            raise ValueError("prefix: must not be empty")
        if int(dedupe_ttl_s) < 1:
            raise ValueError("dedupe_ttl_s: must be >= 1")
        if stream_maxlen < 1:
            raise ValueError("stream_maxlen: must be >= 1")
        self.url = url
        self.prefix = prefix
        self.dedupe_ttl_s = int(dedupe_ttl_s)
        self.stream_maxlen = stream_maxlen
        self._row_prefix = f"{prefix}:row:"
        try:
            # A blocking pool: a burst of requests waits its turn for a connection
            # (up to timeout_s) instead of failing with "Too many connections".
            pool = aredis.BlockingConnectionPool.from_url(
                url, max_connections=max_connections, timeout=timeout_s, decode_responses=True,
                socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        except ValueError as exc:
            raise ValueError(f"redis url {redact_url(url)!r}: {exc}") from None
        self._redis = aredis.Redis.from_pool(pool)        # owns the pool: aclose() closes it
        self._record = self._redis.register_script(RECORD_LUA)

    def _error(self, exc: Exception) -> Exception:
        where = redact_url(self.url)
        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError)):
            return Unavailable(f"metering store: cannot reach Redis at {where} ({exc}); "
                               "check that redis-server is running and the URL is right",
                               component="metering")
        return Internal(f"metering store: Redis at {where} failed: {type(exc).__name__}: {exc}",
                        component="metering")

    def _script_call(self, event: MeterEvent) -> tuple[list[str], list[str | int]]:
        keys = [f"{self.prefix}:seen:{event.request_id}",
                self._row_prefix + encode_key(event.key()),
                f"{self.prefix}:rows", f"{self.prefix}:events"]
        args: list[str | int] = [self.dedupe_ttl_s, self.stream_maxlen, event.input_tokens,
                                 event.output_tokens, event.compute_ns,
                                 event.compute_ns if event.external else 0]
        for name, value in event_fields(event).items():
            args += [name, value]
        return keys, args

    async def record(self, event: MeterEvent) -> bool:
        keys, args = self._script_call(event)
        try:
            return bool(await self._record(keys=keys, args=args))
        except (redis.RedisError, OSError) as exc:
            raise self._error(exc) from exc

    async def record_many(self, events: list[MeterEvent]) -> list[bool]:
        """``record`` each event, in order, in one round trip (a non-transactional
        pipeline on one connection); True for each one counted. On an error some
        may have counted and some not: recording them all again is safe, since each
        keeps its request id (the spool's replay relies on this)."""
        if not events:
            return []
        pipe = self._redis.pipeline(transaction=False)
        try:
            for event in events:
                keys, args = self._script_call(event)
                await self._record(keys=keys, args=args, client=pipe)   # buffered, not sent
            return [bool(counted) for counted in await pipe.execute()]
        except (redis.RedisError, OSError) as exc:
            raise self._error(exc) from exc
        finally:
            await pipe.reset()

    async def rows(self) -> list[MeterRow]:
        try:
            row_keys = sorted(await self._redis.smembers(f"{self.prefix}:rows"))
            hashes: list[dict[str, str]] = []
            for start in range(0, len(row_keys), 500):    # bounded pipelines
                pipe = self._redis.pipeline(transaction=False)
                for key in row_keys[start:start + 500]:
                    pipe.hgetall(key)
                hashes += await pipe.execute()
        except (redis.RedisError, OSError) as exc:
            raise self._error(exc) from exc
        out = []
        for key, counts in zip(row_keys, hashes):
            if not counts or not key.startswith(self._row_prefix):
                continue                                  # deleted by hand: nothing to report
            out.append(_row_of(decode_key(key[len(self._row_prefix):]),
                               {k: int(counts.get(k, 0)) for k in COUNTERS}))
        return sorted(out, key=MeterRow.key)

    async def events(self, since_id: str | None = None,
                     count: int = DEFAULT_EVENTS_PAGE) -> list[StoredEvent]:
        start = "-" if since_id is None else f"({since_id}"     # '(' = exclusive (Redis 6.2+)
        try:
            entries = await self._redis.xrange(f"{self.prefix}:events", min=start, max="+",
                                               count=count)
        except (redis.RedisError, OSError) as exc:
            raise self._error(exc) from exc
        return [StoredEvent(entry_id, event_from_fields(data)) for entry_id, data in entries]

    async def close(self) -> None:
        await self._redis.aclose()


def make_meter(redis_url: str | None, *, metrics=None, spool_capacity: int | None = None) -> Meter:
    """With a Redis URL: a ``RedisMeter`` behind a ``SpooledMeter`` (``router.meter_spool``),
    so a Redis outage spools events for replay instead of losing them; ``metrics``
    (``RouterMetrics``) counts what is spooled, replayed and dropped. Without: the
    in-process ``MemoryMeter``."""
    if redis_url:
        from router.meter_spool import DEFAULT_CAPACITY, SpooledMeter   # it imports this module

        return SpooledMeter(RedisMeter(redis_url), metrics=metrics,
                            capacity=spool_capacity or DEFAULT_CAPACITY)
    return MemoryMeter()
