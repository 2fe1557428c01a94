"""Per-model dispatch: the queue lives here, in the router, where priority can act.

Each model has its own dispatcher (so a fast model never waits behind a slow
one), with one priority queue (interactive before batch, earliest deadline
first) and a cap on in-flight requests per replica. A pump task hands the best
waiting request a replica whenever one has capacity: the least-loaded dedicated
replica under the capacity threshold, else the serverless pool (spill-over).
With no replica at all, requests are held while the autoscaler is asked to warm
the model, and released the moment a replica is ready - or failed at their
deadline with UNAVAILABLE.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from cmesh.config import ModelConfig, RouterConfig
from cmesh.errors import DeadlineExceeded, MeshError, ResourceExhausted, Unavailable
from router.dispatch import ReplicaView, choose, has_any_replica
from router.endpoints import EndpointTable, ReplicaInfo
from router.metrics import RouterMetrics
from router.outlier import OutlierDetector
from router.queueing import QueueEntry, make_queue

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Ticket:
    """One attempt waiting for a replica."""

    latency_class: str
    deadline: float                          # monotonic seconds
    variant: str
    exclude: frozenset[str] = frozenset()    # replicas already tried (retries go elsewhere)
    last_error: MeshError | None = None      # what the previous attempt failed with
    future: asyncio.Future = field(default=None)  # type: ignore[assignment]
    entry: QueueEntry | None = None
    queued_at: float = 0.0
    timer: asyncio.TimerHandle | None = None
    held: bool = False                       # waited while the model had no replica (cold start)


@dataclass(eq=False)
class Lease:
    replica: ReplicaInfo
    spilled: bool
    queue_s: float
    _release: Callable[["Lease"], None]
    released: bool = False
    held: bool = False                       # the wait was for a first replica

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._release(self)


class ModelDispatcher:
    def __init__(self, model: str, config: ModelConfig, router: RouterConfig, table: EndpointTable,
                 outliers: OutlierDetector, metrics: RouterMetrics,
                 warm: Callable[[str], Awaitable[None]], clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        self.config = config
        self.router = router
        self.table = table
        self.outliers = outliers
        self.metrics = metrics
        self._warm = warm
        self._now = clock
        self.queue = make_queue(capacity=router.max_queue_per_model)
        self.in_flight: dict[str, int] = {}
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._holding = False
        self._warm_task: asyncio.Task | None = None
        self._task = asyncio.get_running_loop().create_task(self._pump(), name=f"dispatch-{model}")

    # -- callers --------------------------------------------------------------------

    async def acquire(self, ticket: Ticket) -> Lease:
        now = self._now()
        if not len(self.queue) and not self._holding:
            # Fast path: nobody is waiting, so priority has nothing to decide; take a
            # replica now if one has room (no queue entry, timer or pump wake-up).
            lease = self._grant_now(ticket, now)
            if lease is not None:
                return lease
        ticket.future = asyncio.get_running_loop().create_future()
        ticket.queued_at = now
        if self._holding and len(self.queue) >= self.router.max_held_per_model:
            raise Unavailable(f"model {self.model!r} has no ready replica and {len(self.queue)} requests "
                              f"are already held", component=self.model, retry_after_ms=1000)
        entry = QueueEntry(latency_class=ticket.latency_class, deadline=ticket.deadline, arrival=now,
                           seq=next(self._seq), payload=ticket)
        ticket.entry = entry
        admission = self.queue.offer(entry)
        for shed in admission.shed:
            self._fail(shed.payload, self._shed_error(shed.payload))
        if not admission.accepted:
            raise self._shed_error(ticket)
        self._gauge()
        self._wake.set()
        # A held request waits at most hold_timeout_s for a first replica, and never
        # past its own deadline; the timer re-arms for the deadline if not holding.
        self._arm(ticket, min(ticket.deadline, now + self.router.hold_timeout_s))
        try:
            return await ticket.future
        except asyncio.CancelledError:
            if ticket.future.done() and not ticket.future.cancelled() and ticket.future.exception() is None:
                ticket.future.result().release()      # granted just as the caller left
            self.queue.remove(entry)
            self._gauge()
            raise
        finally:
            if ticket.timer is not None:
                ticket.timer.cancel()

    def _arm(self, ticket: Ticket, at: float) -> None:
        ticket.timer = asyncio.get_running_loop().call_later(max(0.0, at - self._now()), self._expire, ticket)

    def snapshot(self, variant: str = "") -> list[ReplicaView]:
        now = self._now()
        cap_default = self.config.deployment.max_inflight_per_replica
        return [ReplicaView(id=r.id, pool=r.pool, in_flight=self.in_flight.get(r.id, 0),
                            cap=r.max_inflight or cap_default, ready=r.state == "ready",
                            ejected=self.outliers.is_ejected(r.id, now))
                for r in self.table.replicas(self.model) if not variant or r.serves(variant)]

    def on_table_change(self) -> None:
        live = {r.id for r in self.table.replicas(self.model)}
        for rid in list(self.in_flight):
            if rid not in live and not self.in_flight[rid]:
                del self.in_flight[rid]
        self._wake.set()

    @property
    def holding(self) -> bool:
        return self._holding

    async def close(self) -> None:
        self._task.cancel()
        for entry in list(self.queue):
            self._fail(entry.payload, Unavailable("router is shutting down", component=self.model))

    # -- the pump -------------------------------------------------------------------

    async def _pump(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._dispatch_ready()

    def _dispatch_ready(self) -> None:
        while len(self.queue):
            entry = self.queue.peek()
            ticket: Ticket = entry.payload
            if ticket.future.done():            # expired or cancelled meanwhile
                self.queue.pop()
                continue
            views = self.snapshot(ticket.variant)
            choice = choose(views, self.config.deployment.mode, self.config.deployment.capacity_threshold,
                            exclude=set(ticket.exclude))
            if choice is None:
                if not has_any_replica(views, self.config.deployment.mode):
                    self._hold()
                    return
                self._holding = False
                others = [v for v in views if v.id not in ticket.exclude and v.ready and not v.ejected]
                if ticket.exclude and not others:
                    # A retry must go to a different replica and there is none: the
                    # previous attempt's error stands.
                    self.queue.pop()
                    self._fail(ticket, ticket.last_error or Unavailable(
                        f"no other replica of {self.model!r} to retry on", component=self.model))
                    continue
                return                           # wait for capacity (a lease release wakes us)
            self._holding = False
            self.queue.pop()
            ticket.future.set_result(self._lease(ticket, choice, self._now()))
        self._gauge()

    def _grant_now(self, ticket: Ticket, now: float) -> Lease | None:
        ticket.queued_at = now
        choice = choose(self.snapshot(ticket.variant), self.config.deployment.mode,
                        self.config.deployment.capacity_threshold, exclude=ticket.exclude)
        return self._lease(ticket, choice, now) if choice is not None else None

    def _lease(self, ticket: Ticket, choice, now: float) -> Lease:
        replica = next(r for r in self.table.replicas(self.model) if r.id == choice.replica_id)
        self.in_flight[replica.id] = self.in_flight.get(replica.id, 0) + 1
        self.metrics.dispatched(self.model, replica.pool, choice.spilled, now - ticket.queued_at,
                                ticket.latency_class)
        return Lease(replica=replica, spilled=choice.spilled, queue_s=now - ticket.queued_at,
                     _release=self._release, held=ticket.held)

    def _hold(self) -> None:
        for entry in self.queue:                 # their wait is a cold start, not queueing
            entry.payload.held = True
        if not self._holding:
            self._holding = True
            self.metrics.cold_start_wait(self.model)
            log.info("model %s has no ready replica: holding %d request(s), asking for a warm-up",
                     self.model, len(self.queue))
        if self._warm_task is None or self._warm_task.done():
            self._warm_task = asyncio.get_running_loop().create_task(self._warm(self.model))
        self._gauge()

    def _release(self, lease: Lease) -> None:
        rid = lease.replica.id
        self.in_flight[rid] = max(0, self.in_flight.get(rid, 0) - 1)
        self._wake.set()

    def _expire(self, ticket: Ticket) -> None:
        if ticket.future.done():
            return
        if not self._holding and self._now() < ticket.deadline:
            self._arm(ticket, ticket.deadline)     # only the hold limit passed, and we are not holding
            return
        if ticket.entry is not None:
            self.queue.remove(ticket.entry)
        if self._holding:
            err: MeshError = Unavailable(f"no replica of {self.model!r} became ready before the deadline",
                                         component=self.model, retry_after_ms=1000)
            err.reason = "no_replica"
        else:
            err = DeadlineExceeded(f"deadline passed while {self.model!r} was queued in the router",
                                   component=self.model)
        self._fail(ticket, err)
        self._gauge()

    def _fail(self, ticket: Ticket, err: MeshError) -> None:
        if not ticket.future.done():
            ticket.future.set_exception(err)

    def _shed_error(self, ticket: Ticket) -> ResourceExhausted:
        self.metrics.shed(self.model, ticket.latency_class)
        return ResourceExhausted(f"router queue of {self.model!r} is full; {ticket.latency_class} "
                                 f"requests are shed first when batch ones can go",
                                 component=self.model, retry_after_ms=self._retry_after_ms())

    def _retry_after_ms(self) -> int:
        replicas = max(1, len(self.table.replicas(self.model)))
        per_replica = self.config.deployment.max_inflight_per_replica
        return max(50, min(10_000, int(1000 * len(self.queue) / (replicas * per_replica * 20))))

    def _gauge(self) -> None:
        self.metrics.queue_depth(self.model, self.queue)
        self.metrics.holding(self.model, self._holding, len(self.queue) if self._holding else 0)
