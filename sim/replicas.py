"""Simulated replicas and the provider the production controller drives.

``SimProvider`` implements ``autoscaler.providers.base.Provider``: the real
``Controller`` asks it to ``scale`` and reads ``replicas()``; replicas go
warming → ready after a cold start drawn from the model's profile (with
``host.cores``, CPU work that contention stretches), and
draining → gone once their in-flight work is done (drain order as the local
provider's: still-warming ones first, then the newest ready). Change callbacks
are delivered by ``flush()``, which the simulation calls from inside the
controller's event loop (the controller publishes its table from there).

``SimReplica`` serves what the router sends it (the router-replica network
time is paid on the way back, once per finished batch: ``SimReplica.submit``): ``dynamic`` batching runs one
batch at a time (what waits, up to the largest batch, after the queue delay);
``continuous`` batching lets each request join the running batch at once (up
to the largest batch) and take the curve's latency at the size it joined. With
``host.cores`` set, the computing replicas share the host's cores (``Host``:
processor sharing; ``sim.profiles``).
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

import numpy as np

from autoscaler.providers.base import LIVE, ReplicaHandle
from sim.events import EventLoop
from sim.profiles import HostProfile, ModelProfile, Profiles


class Host:
    """CPU cores shared by every replica (None: each replica has its own).

    Processor sharing, as the kernel's fair scheduler shares cores between
    runnable threads: while the computing replicas want more cores
    (``busy``) than the host has for them (``available``), every running
    job progresses at ``available / busy`` of full speed, and each change in
    ``busy`` re-times the jobs still running. A job is one batch (dynamic),
    one call (continuous) or one model load (a cold start); its work is the
    curve's latency, or the cold start, at full speed.
    """

    __slots__ = ("available", "busy", "rate", "loop", "_jobs", "_since", "used_s", "_used_since")

    def __init__(self, profile: HostProfile, loop: EventLoop) -> None:
        self.available = None if profile.cores is None else profile.cores - profile.overhead_cores
        self.busy = 0.0
        self.rate = 1.0
        self.loop = loop
        self._jobs: dict[int, list] = {}    # id -> [work left at full speed (s), fn, args, stamp]
        self._since = loop.now              # when the jobs' work left was last brought up to date
        self.used_s = 0.0                   # core-seconds the replicas computed (with host.cores)
        self._used_since = loop.now

    def run(self, work: float, fn: Callable, args: tuple) -> None:
        """``fn(*args)`` once ``work`` seconds of full-speed compute are done."""
        if self.available is None:
            self.loop.push(self.loop.now + work, fn, args)
            return
        self._settle()
        job = [work, fn, args, 0]
        self._jobs[id(job)] = job
        self.loop.push(self.loop.now + work / self.rate, self._fire, (job, 0))

    def use(self, cores: float) -> None:
        """A replica starts (``cores`` > 0) or stops (< 0) computing."""
        if self.available is None:
            self.busy += cores
            return
        now = self.loop.now
        self.used_s += min(self.busy, self.available) * (now - self._used_since)
        self._used_since = now
        self.busy += cores
        rate = 1.0 if self.busy <= self.available else self.available / self.busy
        if rate != self.rate:
            self._settle()
            self.rate = rate
            now, push = self.loop.now, self.loop.push
            for job in self._jobs.values():
                job[3] += 1
                push(now + job[0] / rate, self._fire, (job, job[3]))

    def cpu_cores(self, since: float) -> float | None:
        """Cores the replicas computed on average from ``since`` to now (what a
        machine-wide busy figure over the same span would show of them); None
        without ``host.cores``."""
        if self.available is None or self.loop.now <= since:
            return None
        self.use(0.0)                       # brings the integral up to now
        return self.used_s / (self.loop.now - since)

    def _settle(self) -> None:
        now = self.loop.now
        done = (now - self._since) * self.rate
        self._since = now
        if done > 0:
            for job in self._jobs.values():
                job[0] -= done

    def _fire(self, job: list, stamp: int) -> None:
        if job[3] != stamp or self._jobs.pop(id(job), None) is None:
            return                                  # re-timed since, or already done
        self._settle()
        job[1](*job[2])


class SimReplica:
    __slots__ = ("id", "model", "pool", "handle", "profile", "curve", "loop", "host", "on_done", "state",
                 "in_flight", "version", "queue", "running", "pending_start", "views", "served",
                 "cores", "max_batch", "delay_s", "continuous", "net_s", "push", "ms")

    def __init__(self, rid: str, model: str, pool: str, handle: ReplicaHandle, profile: ModelProfile,
                 loop: EventLoop, host: Host, on_done: Callable, net_s: float = 0.0) -> None:
        self.id, self.model, self.pool, self.handle = rid, model, pool, handle
        self.profile = profile
        self.curve = profile.curve()
        self.loop, self.host, self.on_done = loop, host, on_done
        self.push = loop.push
        self.net_s = net_s          # router <-> replica, paid on the way back (see submit)
        self.state = "warming"
        self.in_flight = 0          # the router's count: sent and not answered
        self.version = 0            # bumps with in_flight (the router's index)
        self.queue: deque = deque()
        self.running = 0
        self.pending_start = False
        self.views: dict = {}       # in_flight -> the router's cached view and choice
        self.served = 0
        self.ms = None              # the router's per-model state
        self.cores = profile.cpu_cores
        self.max_batch = profile.max_batch_size
        self.delay_s = profile.max_queue_delay_ms / 1000.0
        self.continuous = profile.batching == "continuous"

    # -- work ------------------------------------------------------------------------

    def submit(self, call) -> None:
        """A call from the router, now. The network time (``net_s``) is added on
        the way back, once per finished batch: a constant delay before a replica
        or after it gives every call the same answer time (the replica's
        behaviour does not depend on when its timeline starts), and the router's
        in-flight count spans it either way; only CPU sharing (``host.cores``)
        sees its busy periods ``net_s`` earlier."""
        if self.continuous:
            if self.running < self.max_batch:
                self._start_one(call)
            else:
                self.queue.append(call)
            return
        q = self.queue
        q.append(call)
        if not self.running and not self.pending_start:
            if self.delay_s > 0 and len(q) < self.max_batch:
                self.pending_start = True
                self.push(self.loop.now + self.delay_s, self._start_batch, ())
            else:
                self._start_batch()

    def _start_batch(self) -> None:
        self.pending_start = False
        if self.running or not self.queue:
            return
        q = self.queue
        n = min(len(q), self.max_batch)
        if n == len(q):
            batch = list(q)
            q.clear()
        else:
            batch = [q.popleft() for _ in range(n)]
        self.running = 1
        self.host.use(self.cores)
        self.host.run(self.curve(n), self._batch_done, (batch,))

    def _batch_done(self, batch: list) -> None:
        self.running = 0
        self.host.use(-self.cores)
        self.served += len(batch)
        if self.net_s > 0:
            self.push(self.loop.now + self.net_s, self.on_done, (batch, self))
        else:
            self.on_done(batch, self)
        if self.queue and not self.pending_start and not self.running:
            if self.delay_s > 0 and len(self.queue) < self.max_batch:
                self.pending_start = True
                self.push(self.loop.now + self.delay_s, self._start_batch, ())
            else:
                self._start_batch()

    def _start_one(self, call) -> None:
        if self.running == 0:
            self.host.use(self.cores)
        self.running += 1
        self.host.run(self.curve(self.running) + self.net_s, self._one_done, (call,))

    def _one_done(self, call) -> None:
        # Continuous batching: the answer's network time is in the job's work
        # (one event per call); its slot frees ``net_s`` late, a few ms in seconds.
        self.running -= 1
        if self.running == 0:
            self.host.use(-self.cores)
        self.served += 1
        self.on_done((call,), self)
        if self.queue and self.running < self.max_batch:
            self._start_one(self.queue.popleft())


class SimProvider:
    """The controller's provider over simulated replicas (``Provider`` protocol)."""

    def __init__(self, loop: EventLoop, profiles: Profiles, rng: np.random.Generator, *,
                 on_ready: Callable[[SimReplica], None], on_drain: Callable[[SimReplica], None],
                 on_done: Callable) -> None:
        self.loop = loop
        self.profiles = profiles
        self.rng = rng
        self.host = Host(profiles.host, loop)
        self._on_ready, self._on_drain, self._on_done = on_ready, on_drain, on_done
        self._replicas: dict[str, SimReplica] = {}
        self._handles: list[ReplicaHandle] | None = None
        self._callbacks: list[Callable[[], None]] = []
        self._dirty = False
        self._seq = 0
        # Accounting: ready (and live: warming + ready + draining) replicas per model, integrated.
        self.ready_count: dict[str, int] = {}
        self.live_count: dict[str, int] = {}
        self.ready_s: dict[str, float] = {}
        self.live_s: dict[str, float] = {}
        self._since: dict[str, float] = {}
        self.peak_ready: dict[str, int] = {}
        self.cold_starts: dict[str, list[float]] = {}
        self._modes: dict[str, str] = {}

    def set_modes(self, modes: dict[str, str]) -> None:
        self._modes = dict(modes)

    # -- Provider -------------------------------------------------------------------

    def replicas(self) -> list[ReplicaHandle]:
        if self._handles is None:
            self._handles = [r.handle for r in self._replicas.values()]
        return list(self._handles)

    async def scale(self, model: str, pool: str, desired: int, devices: list[str]) -> None:
        live = [r for r in self._replicas.values()
                if r.model == model and r.pool == pool and r.state in LIVE]
        if desired > len(live):
            for i in range(desired - len(live)):
                self._spawn(model, pool, devices[i] if i < len(devices) else "")
        elif desired < len(live):
            order = sorted(live, key=lambda r: (r.state == "ready", r.handle.started_at, r.id))
            for r in order[:len(live) - desired]:
                self.drain(r)

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    async def close(self) -> None:
        for r in list(self._replicas.values()):
            self.drain(r)

    # -- the simulation's side --------------------------------------------------------

    def flush(self) -> None:
        """Deliver change callbacks (call from inside the controller's event loop)."""
        if self._dirty:
            self._dirty = False
            for cb in self._callbacks:
                cb()

    def provisioned(self) -> dict[str, int]:
        """Replicas starting or ready, per model (what the controller holds; not draining)."""
        out: dict[str, int] = {}
        for r in self._replicas.values():
            if r.state in ("warming", "ready"):
                out[r.model] = out.get(r.model, 0) + 1
        return out

    def get(self, rid: str) -> SimReplica | None:
        return self._replicas.get(rid)

    def finish(self, until: float) -> None:
        for model in list(self._since):
            self._account(model, until)

    def prestart(self, model: str, n: int, pool: str | None = None) -> None:
        """``n`` replicas ready now (a mesh that was already serving)."""
        if pool is None:
            pool = "dedicated" if self.controller_mode(model) == "dedicated" else "serverless"
        for _ in range(n):
            self._spawn(model, pool, "", cold_s=0.0)

    def controller_mode(self, model: str) -> str:
        return self._modes.get(model, "serverless")

    def _spawn(self, model: str, pool: str, device: str, cold_s: float | None = None) -> None:
        profile = self.profiles.for_model(model)
        self._seq += 1
        rid = f"{model}-{pool[0]}{self._seq}"
        now = self.loop.now
        handle = ReplicaHandle(id=rid, model=model, pool=pool, device=device, state="warming",
                               address=f"sim:{self._seq}", started_at=now)
        r = SimReplica(rid, model, pool, handle, profile, self.loop, self.host, self._on_done,
                       self.profiles.host.network_ms / 1000.0)
        self._replicas[rid] = r
        self._changed(model, live=+1)
        cold = profile.cold_start_s if cold_s is None else cold_s
        if cold_s is None and cold > 0 and profile.cold_start_sigma > 0:
            cold = float(self.rng.lognormal(math.log(cold), profile.cold_start_sigma))
        if cold_s == 0.0:
            # Already serving (prestart): it started before the run, like any
            # replica, and reports that cold start as its own measurement.
            self._ready(r, 0.0, reported=profile.cold_start_s)
        elif self.host.available is not None and cold > 0:
            # With CPU sharing, loading a model is CPU work like a batch: it takes
            # cores from the replicas serving, and a busy host stretches it (the
            # local provider, too, lets a replica drained while warming finish).
            self.host.use(r.cores)
            self.host.run(cold, self._loaded, (r, now))
        else:
            self.loop.after(cold, self._ready, r, cold)

    def _loaded(self, r: SimReplica, started: float) -> None:
        self.host.use(-r.cores)
        self._ready(r, self.loop.now - started)

    def _ready(self, r: SimReplica, cold: float, reported: float | None = None) -> None:
        if r.state != "warming":
            return                                  # drained while it was starting
        r.state = r.handle.state = "ready"
        r.handle.cold_start_s = cold if reported is None else reported
        self.cold_starts.setdefault(r.model, []).append(cold)
        self._changed(r.model, ready=+1)
        self._on_ready(r)

    def drain(self, r: SimReplica) -> None:
        if r.state in ("draining", "gone"):
            return
        was_ready = r.state == "ready"
        r.state = r.handle.state = "draining"
        self._changed(r.model, ready=-1 if was_ready else 0)
        if was_ready:
            self._on_drain(r)
        self.maybe_gone(r)

    def maybe_gone(self, r: SimReplica) -> None:
        if r.state == "draining" and r.in_flight == 0:
            r.state = r.handle.state = "gone"
            del self._replicas[r.id]
            self._changed(r.model, live=-1)

    def _changed(self, model: str, ready: int = 0, live: int = 0) -> None:
        self._account(model, self.loop.now)
        if ready:
            n = self.ready_count[model] = self.ready_count.get(model, 0) + ready
            if n > self.peak_ready.get(model, 0):
                self.peak_ready[model] = n
        if live:
            self.live_count[model] = self.live_count.get(model, 0) + live
        self._handles = None
        self._dirty = True

    def _account(self, model: str, now: float) -> None:
        since = self._since.get(model, now)
        dt = now - since
        if dt > 0:
            self.ready_s[model] = self.ready_s.get(model, 0.0) + dt * self.ready_count.get(model, 0)
            self.live_s[model] = self.live_s.get(model, 0.0) + dt * self.live_count.get(model, 0)
        self._since[model] = now
