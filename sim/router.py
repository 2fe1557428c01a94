"""The router in virtual time: the production queue and dispatch policies.

Per model, as ``router.dispatcher.ModelDispatcher`` does: one queue from
``router.queueing.make_queue`` (interactive before batch, earliest deadline
first, bounded, batch shed first), and each waiting request goes to the replica
``router.dispatch.choose`` picks (least loaded dedicated replica under the
capacity threshold, else spill-over to serverless, never past the in-flight
cap); with no ready replica at all (``router.dispatch.has_any_replica``) the
requests are held, bounded by ``router.max_held_per_model`` and
``router.hold_timeout_s``, while the autoscaler is asked to warm the model.

What ``choose`` is given: per pool, the least loaded ready replica, kept in a
heap by (in flight, id), the order ``choose`` ranks by (every replica of a
model has the same cap). ``choose`` only ever looks at the least loaded
replica of each pool and ``has_any_replica`` only at whether one exists, so
their answers on these views are their answers on the whole table
(``tests/test_sim_core.py`` checks this on random tables); the heap keeps a
dispatch O(log n) in the number of replicas instead of O(n).

Every ``report_s`` the router sends the autoscaler the production
``LoadReport`` (queued + in flight, arrivals since the last report, held).
"""
from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

from cmesh.config import MeshConfig
from protos import mesh_pb2
from router.dispatch import ReplicaView, choose, has_any_replica
from router.queueing import QueueEntry, make_queue
from sim.events import EventLoop
from sim.replicas import SimReplica

_POOLS = {"dedicated": ("dedicated",), "serverless": ("serverless",), "auto": ("dedicated", "serverless")}


class Call:
    """One node (or direct model) call."""

    __slots__ = ("req", "node", "model", "lc", "deadline", "arrival", "entry", "done", "replica")

    def __init__(self, req, node: str, model: str, lc: str, deadline: float, arrival: float) -> None:
        self.req, self.node, self.model, self.lc = req, node, model, lc
        self.deadline, self.arrival = deadline, arrival
        self.entry: QueueEntry | None = None
        self.done = False
        self.replica: SimReplica | None = None


class _Model:
    __slots__ = ("name", "mode", "threshold", "cap", "queue", "heaps", "pools", "holding", "arrivals",
                 "in_flight", "warm_at", "ready", "single")

    def __init__(self, name: str, config: MeshConfig) -> None:
        spec = config.models[name].deployment
        self.name = name
        self.mode = spec.mode
        self.threshold = spec.capacity_threshold
        self.cap = spec.max_inflight_per_replica
        self.queue = make_queue(capacity=config.router.max_queue_per_model)
        self.pools = _POOLS[spec.mode]
        self.heaps: dict[str, list] = {p: [] for p in ("dedicated", "serverless")}
        # One pool (dedicated or serverless): its heap, for the fast path.
        self.single = self.heaps[self.pools[0]] if len(self.pools) == 1 else None
        self.holding = False
        self.arrivals = 0
        self.in_flight = 0
        self.warm_at = -1e18
        self.ready = 0


class SimRouter:
    def __init__(self, config: MeshConfig, loop: EventLoop, *, network_s: float,
                 on_finish: Callable[[Call, str | None], None], warm: Callable[[str], None],
                 gone: Callable[[SimReplica], None]) -> None:
        self.config = config
        self.loop = loop
        self.network_s = network_s      # paid by the replica on the way back (SimReplica.submit)
        self._finish = on_finish        # (call, None) answered; (call, reason) failed
        self._warm = warm
        self._gone = gone
        self.models = {m: _Model(m, config) for m in config.models}
        self.hold_timeout_s = config.router.hold_timeout_s
        self.max_held = config.router.max_held_per_model
        self.warm_period_s = config.autoscaler.tick_s
        self._seq = itertools.count()
        self.failures: dict[str, int] = {}
        self.spilled = 0

    # -- requests in ----------------------------------------------------------------

    def submit(self, call: Call) -> None:
        ms = self.models[call.model]
        ms.arrivals += 1
        if not ms.queue and not ms.holding:
            r = self._pick(ms)[0]
            if r is not None:
                self._send(ms, call, r)
                return
        if ms.holding and len(ms.queue) >= self.max_held:
            self._fail(call, "no_replica_held_full")
            return
        entry = QueueEntry(latency_class=call.lc, deadline=call.deadline, arrival=self.loop.now,
                           seq=next(self._seq), payload=call)
        call.entry = entry
        admission = ms.queue.offer(entry)
        for shed in admission.shed:
            self._fail(shed.payload, "shed")
        if not admission.accepted:
            self._fail(call, "shed")
            return
        self._pump(ms)

    def cancel(self, call: Call) -> None:
        """The caller gave up (a node timeout): out of the queue if still there."""
        if call.entry is not None and not call.done:
            self.models[call.model].queue.remove(call.entry)
        call.done = True

    # -- dispatch -------------------------------------------------------------------

    @staticmethod
    def _top(heap: list) -> SimReplica | None:
        while heap:
            _, _, version, r = heap[0]
            if r.version == version and r.state == "ready":
                return r
            heapq.heappop(heap)
        return None

    def _view(self, r: SimReplica, ms: _Model) -> tuple:
        """(view, choice, any ready) for ``r`` at its in-flight count: the view is
        immutable, and with one pool ``choose`` and ``has_any_replica`` see only
        it, so their answers (pure functions of it) are computed once per count."""
        e = r.views.get(r.in_flight)
        if e is None:
            v = ReplicaView(id=r.id, pool=r.pool, in_flight=r.in_flight, cap=ms.cap)
            e = r.views[r.in_flight] = (v, choose((v,), ms.mode, ms.threshold), has_any_replica((v,), ms.mode))
        return e

    def _pick(self, ms: _Model) -> tuple[SimReplica | None, bool]:
        """(replica, any ready replica at all) by the production policy."""
        heap = ms.single
        if heap is not None:
            r = self._top(heap)
            if r is None:
                return None, False
            _, choice, any_ready = self._view(r, ms)
            if choice is None:
                return None, any_ready
            if choice.spilled:
                self.spilled += 1
            return r, True
        tops = [r for r in (self._top(ms.heaps[p]) for p in ms.pools) if r is not None]
        if not tops:
            return None, False
        views = [self._view(r, ms)[0] for r in tops]
        choice = choose(views, ms.mode, ms.threshold)
        if choice is None:
            return None, has_any_replica(views, ms.mode)
        if choice.spilled:
            self.spilled += 1
        return (tops[0] if tops[0].id == choice.replica_id else tops[1]), True

    def _pump(self, ms: _Model) -> None:
        q = ms.queue
        while q:
            entry = q.peek()
            call: Call = entry.payload
            if call.done:
                q.pop()
                continue
            r, any_ready = self._pick(ms)
            if r is None:
                if not any_ready:
                    self._hold(ms)
                else:
                    ms.holding = False
                return
            ms.holding = False
            q.pop()
            self._send(ms, call, r)

    def _push(self, ms: _Model, r: SimReplica) -> None:
        r.version += 1
        heap = ms.heaps[r.pool]
        heapq.heappush(heap, (r.in_flight, r.id, r.version, r))
        if len(heap) > 4 * ms.ready + 64:
            live = [e for e in heap if e[3].version == e[2] and e[3].state == "ready"]
            heapq.heapify(live)
            ms.heaps[r.pool][:] = live

    def _send(self, ms: _Model, call: Call, r: SimReplica) -> None:
        """``r`` was just picked: its entry is the top of its pool's heap, and the
        new count replaces it there (one sift instead of a push and a later pop)."""
        r.in_flight += 1
        ms.in_flight += 1
        r.version += 1
        heapq.heapreplace(ms.heaps[r.pool], (r.in_flight, r.id, r.version, r))
        call.replica = r
        call.entry = None
        r.submit(call)

    def _hold(self, ms: _Model) -> None:
        ms.holding = True
        now = self.loop.now
        if now - ms.warm_at >= self.warm_period_s:
            ms.warm_at = now
            self._warm(ms.name)

    # -- replicas -------------------------------------------------------------------

    def on_done(self, batch, r: SimReplica) -> None:
        """A batch of ``r``'s calls answered (their network time included): one
        count update and one index push for the whole batch."""
        ms = r.ms
        n = len(batch)
        r.in_flight -= n
        ms.in_flight -= n
        if r.state == "ready":
            self._push(ms, r)
        else:
            self._gone(r)
        if ms.queue:
            self._pump(ms)
        now = self.loop.now
        finish = self._finish
        for call in batch:
            if not call.done:
                call.done = True
                finish(call, "deadline" if now > call.deadline else None)

    def on_ready(self, r: SimReplica) -> None:
        ms = r.ms = self.models[r.model]
        ms.ready += 1
        self._push(ms, r)
        if ms.queue:
            self._pump(ms)

    def on_drain(self, r: SimReplica) -> None:
        self.models[r.model].ready -= 1        # its heap entries go stale (state check)

    # -- time -----------------------------------------------------------------------

    def sweep(self) -> None:
        """Expire what waited too long (the production timers, at 1 s resolution here)."""
        now = self.loop.now
        for ms in self.models.values():
            q = ms.queue
            if not q:
                continue
            if ms.holding:
                for entry in list(q):
                    call = entry.payload
                    if now >= call.deadline or now >= entry.arrival + self.hold_timeout_s:
                        q.remove(entry)
                        self._fail(call, "no_replica")
                if q:
                    self._pump(ms)                  # re-asks for a warm-up while holding
            else:
                for entry in q.expire(now):
                    self._fail(entry.payload, "deadline")

    def report(self) -> mesh_pb2.LoadReport:
        report = mesh_pb2.LoadReport(source="sim-router", timestamp_ms=int(self.loop.now * 1000))
        for ms in self.models.values():
            queued = len(ms.queue)
            report.models.add(model=ms.name, queue_depth=queued, in_flight=ms.in_flight,
                              arrivals=ms.arrivals, ready=True)
            ms.arrivals = 0
            if ms.holding:
                report.held[ms.name] = queued
        return report

    def _fail(self, call: Call, reason: str) -> None:
        if call.done:
            return
        call.done = True
        self.failures[reason] = self.failures.get(reason, 0) + 1
        self._finish(call, reason)
