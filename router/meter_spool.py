"""A metering spool: events wait in memory while the store is away and are replayed when it returns.

``SpooledMeter`` decorates a ``Meter`` (in the router, the ``RedisMeter``) and is a
``Meter`` itself, so the router core's ``await meter.record(event)`` is unchanged.
``record`` never raises because the store is down: an event the store refuses
(``MeshError``: Redis unreachable, timing out, loading, read-only, out of memory)
goes into the spool, and a background task replays the spool, oldest first,
once the store answers again.

Capacity and what happens when full
    The spool holds at most ``capacity`` events, by default 200,000 — about 80 MB
    at roughly 400 bytes per event with 36-character request ids, or some 100 s of
    outage at 2,000 requests/s. It is memory only. When it is full, the *newest*
    event is dropped: the events already waiting keep their places, the dropped
    one is counted (``dropped_total``, ``cmesh_metering_dropped_total``) and
    logged, and the cost report says it is incomplete from then on. Never silent.

Replay and backoff
    The replay task is the probe: it sleeps ``Backoff.delay(n)`` after the n-th
    failure in a row (0.1 s, 0.2 s, … capped at 2 s) and then tries the spool's
    head again; a success resets the backoff. It sends up to ``batch_size``
    events at a time through the inner meter's ``record_many`` when it has one
    (one ordered round trip), else one ``record`` at a time. Clock and sleep are
    injected, so tests drive the loop without waiting.

Ordering and exactly once
    * While the spool holds anything, ``record`` appends behind it and does not
      touch the store, so a new event can never overtake a spooled one; the
      replay task removes events only after the store confirmed them, and the
      spool turns back to the direct path only when it is empty (checked and
      switched with no ``await`` in between). Each event carries a sequence
      number taken when ``record`` was called; an event whose direct call failed
      late goes back to its place by that number. The router has one metering
      task that awaits each ``record``, so this is the order requests finished.
    * An event is sent again until the store confirms it, so nothing accepted is
      lost; it may reach Redis more than once (a reply lost after the script ran,
      a batch cut half way), which is safe because the event keeps its original
      request id and timestamp and the Lua script's ``SET NX`` on the request id
      counts it once. This holds while the outage plus the replay is shorter than
      the store's dedupe window (``RedisMeter.dedupe_ttl_s``, a day by default).
    * A clean stop (``close``) tries a last flush for at most ``close_timeout_s``;
      what is still unrecorded then is logged with its count and counted as
      dropped. A router killed outright loses what its spool held.
    * The spool covers what the router could not deliver; what Redis had already
      acknowledged survives a Redis restart only with persistence (an append-only
      file fsynced on every write, as ``loadtest.chaos_metering`` runs it).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cmesh.backoff import Backoff
from cmesh.errors import MeshError
from router.metering import DEFAULT_EVENTS_PAGE, Meter, MeterEvent, MeterRow, StoredEvent

log = logging.getLogger(__name__)

DEFAULT_CAPACITY = 200_000
DEFAULT_BATCH = 256


# The replay probe's delays: 0.1 s after the first failure, doubling to 2 s, no
# jitter (one probe per router, nothing to spread out); ``Backoff.delay`` is pure.
REPLAY_BACKOFF = Backoff(initial_s=0.1, max_s=2.0, multiplier=2.0, jitter=0.0)


@dataclass(frozen=True)
class SpoolStatus:
    """What the spool holds and has done since the meter was built."""

    depth: int                # events waiting for the store now
    spooled_total: int        # events that went into the spool
    replayed_total: int       # spooled events the store has since confirmed (counted, or
                              # found already counted: a reply lost after the script ran)
    dropped_total: int        # events lost: spool full, or still spooled at close
    store_down: bool          # the last call to the store failed
    outage_s: float           # how long the store has been failing (0 when up)

    @property
    def incomplete(self) -> bool:
        """Whether the store lacks events this meter accepted."""
        return self.depth > 0 or self.dropped_total > 0


@runtime_checkable
class Spooling(Protocol):
    def spool_status(self) -> SpoolStatus: ...


class SpoolMetrics(Protocol):
    """What the spool reports to (``router.metrics.RouterMetrics``)."""

    def metering_spooled(self, n: int) -> None: ...
    def metering_replayed(self, n: int) -> None: ...
    def metering_dropped(self, n: int) -> None: ...
    def metering_spool_depth(self, depth: int) -> None: ...


@dataclass(frozen=True, eq=False, slots=True)   # compared by identity: removed by identity
class _Entry:
    seq: int
    event: MeterEvent


class SpooledMeter:
    """A ``Meter`` that spools what ``inner`` refuses and replays it when ``inner`` is back."""

    def __init__(self, inner: Meter, *, capacity: int = DEFAULT_CAPACITY,
                 batch_size: int = DEFAULT_BATCH, backoff: Backoff = REPLAY_BACKOFF,
                 close_timeout_s: float = 3.0, metrics: SpoolMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
                 log_every_s: float = 10.0) -> None:
        if capacity < 1:
            raise ValueError("capacity: must be >= 1")
        if batch_size < 1:
            raise ValueError("batch_size: must be >= 1")
        if close_timeout_s < 0:
            raise ValueError("close_timeout_s: must be >= 0")
        self.inner = inner
        self.capacity = capacity
        self.batch_size = batch_size
        self.backoff = backoff
        self.close_timeout_s = close_timeout_s
        self._metrics = metrics
        self._clock = clock
        self._sleep = sleep
        self._log_every_s = log_every_s
        self._spool: deque[_Entry] = deque()
        self._seq = itertools.count()
        self._replayer: asyncio.Task | None = None
        self._empty = asyncio.Event()
        self._empty.set()
        self._closed = False
        self._down_since: float | None = None
        self._last_log = float("-inf")
        self._drop_logged = float("-inf")
        self.spooled_total = 0
        self.replayed_total = 0
        self.dropped_total = 0

    # -- Meter -------------------------------------------------------------------------

    async def record(self, event: MeterEvent) -> bool:
        """Count ``event`` now, or keep it for replay. True when the store counted it now
        or it waits in the spool (it will be counted unless its id already was); False
        for a duplicate the store refused now, or an event dropped by a full spool."""
        seq = next(self._seq)
        if self._closed:
            self._drop(1, "the meter is closed")
            return False
        if self._spool:                       # others are waiting: queue behind them
            return self._put(_Entry(seq, event))
        try:
            return await self.inner.record(event)
        except MeshError as exc:
            self._store_failed(exc)
            return self._put(_Entry(seq, event))

    async def rows(self) -> list[MeterRow]:
        return await self.inner.rows()

    async def events(self, since_id: str | None = None,
                     count: int = DEFAULT_EVENTS_PAGE) -> list[StoredEvent]:
        return await self.inner.events(since_id, count)

    async def close(self) -> None:
        """Stop replaying, try one last flush within ``close_timeout_s``, close ``inner``."""
        if self._closed:
            return
        self._closed = True
        if self._replayer is not None:
            self._replayer.cancel()
            try:
                await self._replayer
            except asyncio.CancelledError:
                pass
        if self._spool:
            reason = ""
            try:
                await asyncio.wait_for(self._flush(), self.close_timeout_s)
            except asyncio.TimeoutError:
                reason = f"no answer within {self.close_timeout_s:g} s"
            except MeshError as exc:
                reason = exc.message
            except Exception as exc:           # noqa: BLE001 - the stop must go on
                reason = f"{type(exc).__name__}: {exc}"
            if self._spool:
                left = len(self._spool)
                log.error("metering: %d events remain unrecorded at stop: the last flush to the "
                          "store failed (%s); they are lost from the cost report", left, reason)
                self._spool.clear()
                self._depth_changed()
                self._drop(left, None)
        await self.inner.close()

    # -- status ------------------------------------------------------------------------

    def spool_status(self) -> SpoolStatus:
        down = self._down_since is not None
        return SpoolStatus(depth=len(self._spool), spooled_total=self.spooled_total,
                           replayed_total=self.replayed_total, dropped_total=self.dropped_total,
                           store_down=down,
                           outage_s=self._clock() - self._down_since if down else 0.0)

    async def drained(self) -> None:
        """Wait until nothing is spooled (forever while the store stays away: bound it)."""
        await self._empty.wait()

    # -- inside ------------------------------------------------------------------------

    def _put(self, entry: _Entry) -> bool:
        if len(self._spool) >= self.capacity:
            self._drop(1, f"the spool is full ({self.capacity} events)")
            return False
        if not self._spool or self._spool[-1].seq < entry.seq:
            self._spool.append(entry)
        else:                                  # a direct call that failed late: back to its place
            index = len(self._spool)
            while index > 0 and self._spool[index - 1].seq > entry.seq:
                index -= 1
            self._spool.insert(index, entry)
        self.spooled_total += 1
        if self._metrics is not None:
            self._metrics.metering_spooled(1)
        self._depth_changed()
        if self._replayer is None or self._replayer.done():
            self._replayer = asyncio.get_running_loop().create_task(self._replay(),
                                                                    name="metering-replay")
        return True

    def _drop(self, n: int, reason: str | None) -> None:
        self.dropped_total += n
        if self._metrics is not None:
            self._metrics.metering_dropped(n)
        now = self._clock()
        if reason is not None and now - self._drop_logged >= self._log_every_s:
            self._drop_logged = now
            log.error("metering: event dropped: %s; %d dropped so far (the cost report says "
                      "it is incomplete)", reason, self.dropped_total)

    def _depth_changed(self) -> None:
        if self._spool:
            self._empty.clear()
        else:
            self._empty.set()
        if self._metrics is not None:
            self._metrics.metering_spool_depth(len(self._spool))

    def _store_failed(self, exc: MeshError) -> None:
        now = self._clock()
        if self._down_since is None:
            self._down_since = now
            self._last_log = now
            log.warning("metering: store unavailable (%s); spooling events (up to %d) and "
                        "replaying them when it is back", exc.message, self.capacity)
        elif now - self._last_log >= self._log_every_s:
            self._last_log = now
            log.warning("metering: store still unavailable after %.0f s (%s); %d events spooled",
                        now - self._down_since, exc.message, len(self._spool))

    def _store_answered(self) -> None:
        if self._down_since is not None and not self._spool:
            log.warning("metering: store back after %.1f s; %d events replayed so far, %d dropped",
                        self._clock() - self._down_since, self.replayed_total, self.dropped_total)
            self._down_since = None

    async def _replay(self) -> None:
        """Replay the spool, oldest first, until it is empty; back off while the store fails."""
        failures = 1                           # the spool only fills after a failure
        while self._spool and not self._closed:
            await self._sleep(self.backoff.delay(failures))
            try:
                while self._spool and not self._closed:
                    await self._replay_batch()
                    failures = 1
            except MeshError as exc:
                failures += 1
                self._store_failed(exc)
            except Exception:                  # noqa: BLE001 - a bug must not strand the spool
                failures += 1
                log.exception("metering: replay failed; retrying")
        self._store_answered()

    async def _flush(self) -> None:
        while self._spool:
            await self._replay_batch()
        self._store_answered()

    async def _replay_batch(self) -> None:
        batch = list(itertools.islice(self._spool, self.batch_size))
        record_many = getattr(self.inner, "record_many", None)
        if record_many is not None:
            await record_many([entry.event for entry in batch])
            self._confirmed(batch)
            return
        for entry in batch:
            await self.inner.record(entry.event)
            self._confirmed([entry])

    def _confirmed(self, batch: Sequence[_Entry]) -> None:
        """The store has counted (or already had) ``batch``: take it out of the spool."""
        head = itertools.islice(self._spool, len(batch))
        if all(a is b for a, b in itertools.zip_longest(head, batch)):
            for _ in batch:
                self._spool.popleft()
        else:                                  # something was put back in front meanwhile
            done = {id(entry) for entry in batch}
            self._spool = deque(e for e in self._spool if id(e) not in done)
        self.replayed_total += len(batch)
        if self._metrics is not None:
            self._metrics.metering_replayed(len(batch))
        self._depth_changed()
