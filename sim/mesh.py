"""The simulated mesh: production controller and policies, simulated replicas, one run.

``simulate(config, profiles, workload, ...)`` wires an ``EventLoop`` (virtual
time) to the production ``autoscaler.controller.Controller`` (clock and wall
clock injected; its provider is ``sim.replicas.SimProvider``), the simulated
router (``sim.router``) and one flow per pipeline and model, replays the
workload and returns a ``SimResult``. The controller's coroutines (``tick``,
``warm``) run on a private asyncio loop, each to completion at one virtual
instant, so a decision takes no virtual time, as a tick of a few milliseconds
takes next to none in production.

Conservation: every request ends exactly once, answered or failed with a
reason (``SimResult.outcomes``); the run continues after the last arrival
until nothing is outstanding (or ``tail_s`` passes, and what is left is
counted as ``unfinished``).
"""
from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from autoscaler.controller import Controller
from cmesh.config import MeshConfig, parse_config
from sim.events import EventLoop
from sim.pipelines import ModelFlow, PipelineFlow, Request
from sim.profiles import Profiles
from sim.replicas import SimProvider
from sim.router import Call, SimRouter
from sim.stats import Histogram, IntervalP95
from sim.workload import Workload

STRATEGIES = ("permodel", "static", "uniform")
WALL0 = 1_767_600_000.0          # a Monday 08:00 UTC is not needed; schedules see wall0 + now


@dataclass
class SimOptions:
    strategy: str = "permodel"
    seed: int = 0
    static_counts: dict[str, int] | None = None   # static: fixed replicas per model (default: permodel's peak)
    coordinated: bool | None = None               # None: the config's autoscaler.coordinated_prewarm
    graph_ahead: bool | None = None               # None: the config's autoscaler.graph_ahead
    warm_start: bool = True                       # warm every model first, as loadtest.experiments does
    report_s: float = 1.0                         # routers' load report period
    interval_s: float = 10.0                      # per-interval P95 resolution (virtual seconds)
    tail_s: float = 300.0                         # after the last arrival, wait at most this long
    wall0: float = WALL0                          # wall clock at virtual time 0 (schedules)
    timeline: bool = True
    prestart: dict[str, int] = field(default_factory=dict)   # replicas already ready at time 0, per model


def strategy_config(config: MeshConfig, strategy: str, static_counts: dict[str, int] | None = None,
                    *, coordinated: bool | None = None, graph_ahead: bool | None = None) -> MeshConfig:
    """``config`` deployed as ``strategy`` says (``loadtest.experiment_plan``'s rules)."""
    from loadtest.experiment_plan import strategy_config as plan_strategy

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")
    data = config.model_dump(mode="json")
    data = plan_strategy(data, strategy, static_counts)
    if coordinated is not None:
        data["autoscaler"]["coordinated_prewarm"] = coordinated
    if graph_ahead is not None:
        data["autoscaler"]["graph_ahead"] = graph_ahead
    return parse_config(data, "simulated mesh.yaml")


@dataclass
class SimResult:
    strategy: str
    workload: str
    duration_s: float                      # virtual seconds the workload ran (start to last answer)
    requests: int
    outcomes: dict[str, int]               # "answered", "degraded" (answered, part missing), "failed:<why>"
    by_target: dict[str, dict]             # "pipeline:x|interactive" -> counts and latency
    by_model: dict[str, dict]              # replica-seconds, cost, peak replicas, call latency
    totals: dict
    intervals: dict[str, IntervalP95] = field(repr=False, default_factory=dict)
    timeline: list = field(repr=False, default_factory=list)
    provisioned: list = field(repr=False, default_factory=list)
    cold_starts: dict[str, list[float]] = field(repr=False, default_factory=dict)
    events: int = 0
    wall_s: float = 0.0
    # Cores the replicas computed on average over the simulated span, with
    # ``host.cores`` (CPU sharing); else None.
    cpu_cores: float | None = None

    @property
    def replica_s(self) -> float:
        return sum(m["replica_s"] for m in self.by_model.values())

    @property
    def cost(self) -> float:
        return sum(m["cost"] for m in self.by_model.values())

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "workload": self.workload, "duration_s": round(self.duration_s, 3),
                "requests": self.requests, "outcomes": self.outcomes, "totals": self.totals,
                "by_target": self.by_target, "by_model": self.by_model, "events": self.events,
                "wall_s": round(self.wall_s, 3),
                "events_per_s": round(self.events / self.wall_s) if self.wall_s > 0 else None}


class Simulation:
    def __init__(self, config: MeshConfig, profiles: Profiles, workload: Workload,
                 options: SimOptions | None = None) -> None:
        self.options = o = options or SimOptions()
        self.config = strategy_config(config, o.strategy, o.static_counts, coordinated=o.coordinated,
                                      graph_ahead=o.graph_ahead)
        self.profiles = profiles
        self.workload = workload
        self.loop = EventLoop()
        self._started_at = self.loop.now
        self._aio = asyncio.new_event_loop()
        self.router = SimRouter(self.config, self.loop, network_s=profiles.host.network_ms / 1000.0,
                                on_finish=self._call_done, warm=self._warm, gone=self._gone)
        self.provider = SimProvider(self.loop, profiles, np.random.default_rng([o.seed, 1]),
                                    on_ready=self.router.on_ready, on_drain=self.router.on_drain,
                                    on_done=self.router.on_done)
        self.provider.set_modes({m: c.deployment.mode for m, c in self.config.models.items()})
        self.controller = Controller(self.config, self.provider, clock=self.loop.clock,
                                     wall=lambda: o.wall0 + self.loop.now, coordinated=o.coordinated)
        rng = random.Random(o.seed)
        self.flows: dict[tuple[str, str], object] = {}
        for name in self.config.pipelines:
            self.flows[("pipeline", name)] = PipelineFlow(
                name, self.config, profiles, rng, self.router.submit, self.router.cancel, self.loop.after,
                self.loop.clock, self._request_done)
        for name in self.config.models:
            self.flows[("model", name)] = ModelFlow(name, self.router.submit, self.loop.clock, self._request_done)
        self.hist: dict[str, Histogram] = {}
        self.intervals: dict[str, IntervalP95] = {}
        self.call_hist: dict[str, Histogram] = {m: Histogram() for m in self.config.models}
        self._call_add = {m: h.add for m, h in self.call_hist.items()}
        self.all = Histogram()
        self._all_add = self.all.add
        self._targets: dict[str, tuple] = {}
        self.outcomes: dict[str, int] = {}
        self.counts: dict[str, dict[str, int]] = {}
        self.outstanding = 0
        self.timeline: list = []            # (t, ready replicas per model) every tick
        self.provisioned: list = []         # (t, starting + ready replicas per model): what the policy holds
        self.t_start = 0.0
        self._timeout_s = self.config.router.default_timeout_s

    # -- production components' callbacks ------------------------------------------------

    def _run(self, coro) -> object:
        return self._aio.run_until_complete(coro)

    async def _tick(self) -> None:
        self.provider.flush()
        await self.controller.tick()
        self.provider.flush()

    def _warm(self, model: str) -> None:
        self._run(self.controller.warm(model=model, reason="held"))

    def _gone(self, r) -> None:
        self.provider.maybe_gone(r)

    def _call_done(self, call: Call, reason: str | None) -> None:
        if reason is None:
            self._call_add[call.model]((self.loop.now - call.arrival) * 1000.0)
        call.req.flow.on_call(call, reason)

    def _target(self, key: str) -> tuple:
        """(counts, latency add, interval add) of one "kind:target|class" key."""
        t = self._targets.get(key)
        if t is None:
            c = self.counts[key] = {"requests": 0, "answered": 0, "degraded": 0, "failed": 0}
            h = self.hist[key] = Histogram()
            iv = self.intervals[key] = IntervalP95(self.options.interval_s)
            t = self._targets[key] = (c, h.add, iv.add, iv.fail)
        return t

    def _request_done(self, req: Request, reason: str | None) -> None:
        self.outstanding -= 1
        c, add, interval_add, interval_fail = self._target(req.key)
        c["requests"] += 1
        if reason is None:
            ms = (self.loop.now - req.t0) * 1000.0
            add(ms)
            self._all_add(ms)
            interval_add(req.t0 - self.t_start, ms)
            outcome = "degraded" if req.degraded else "answered"
            c[outcome] += 1
        else:
            c["failed"] += 1
            interval_fail(req.t0 - self.t_start)
            outcome = f"failed:{reason}"
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    # -- arrivals ----------------------------------------------------------------------

    def _feed(self, t0: float) -> int:
        """Every stream's arrivals merged into one time-ordered feed of the loop."""
        streams = [s for s in self.workload.streams if len(s.times)]
        if not streams:
            return 0
        times = np.concatenate([np.asarray(s.times, dtype=float) for s in streams])
        which = np.concatenate([np.full(len(s.times), i, dtype=np.int32) for i, s in enumerate(streams)])
        texts = np.concatenate([np.asarray(s.text_idx, dtype=np.int64) for s in streams])
        order = np.argsort(times, kind="stable")
        abs_times = (t0 + times[order]).tolist()
        which, texts = which[order].tolist(), texts[order].tolist()
        meta = [(self.flows[(s.kind, s.target)], s.kind, s.target, s.latency_class, s.texts,
                 f"{s.kind}:{s.target}|{s.latency_class}") for s in streams]
        timeout, loop = self._timeout_s, self.loop

        def arrive(i: int) -> None:
            flow, kind, target, lc, tx, key = meta[which[i]]
            now = loop.now
            self.outstanding += 1
            flow.start(Request(flow, kind, target, lc, now, now + timeout, texts[i], tx, key))

        loop.feed(abs_times, arrive)
        return len(abs_times)

    # -- the run -----------------------------------------------------------------------

    def _periodic(self) -> None:
        loop, cfg = self.loop, self.config.autoscaler
        loop.every(self.options.report_s, lambda: self.controller.on_report(self.router.report()))
        loop.every(cfg.tick_s, lambda: self._run(self._tick()))
        loop.every(1.0, self.router.sweep)
        if self.options.timeline:
            loop.every(cfg.tick_s, self._sample)

    def _sample(self) -> None:
        t = round(self.loop.now - self.t_start, 3)
        self.timeline.append((t, {m: self.provider.ready_count.get(m, 0) for m in self.config.models}))
        self.provisioned.append((t, self.provider.provisioned()))

    def _warm_up(self, limit_s: float = 900.0) -> None:
        """Warm every pipeline and model and wait until each has the replicas the
        policy wants ready (at least one, unless it wants none: a warm-up floor
        shorter than the cold start lets a model go back to zero)."""
        for p in self.config.pipelines:
            self._run(self.controller.warm(pipeline=p, reason="experiment"))
        for m in self.config.models:
            self._run(self.controller.warm(model=m, reason="experiment"))
        while self.loop.now < limit_s:
            self.loop.run(self.loop.now + 0.5)
            decisions = self.controller._decisions
            wanted = {m: getattr(decisions.get(m), "total", 1) for m in self.config.models}
            if all(self.provider.ready_count.get(m, 0) >= max(1 if n else 0, n) for m, n in wanted.items()):
                return

    def run(self, progress: Callable[[str], None] | None = None) -> SimResult:
        started = time.perf_counter()
        self._periodic()
        for model, n in self.options.prestart.items():
            self.provider.prestart(model, n)
        if self.options.warm_start:
            self._warm_up()
        self.t_start = t0 = self.loop.now
        self.provider.finish(t0)
        base_ready = dict(self.provider.ready_s)
        base_live = dict(self.provider.live_s)
        self.timeline.clear()
        self.provisioned.clear()
        total = self._feed(t0)
        end = t0 + self.workload.duration_s
        step = max(10.0, self.workload.duration_s / 20)
        t = t0
        while t < end:
            t = min(end, t + step)
            self.loop.run(t)
            if progress:
                progress(f"simulated {t - t0:.0f}/{self.workload.duration_s:.0f} s, {self.loop.events:,} events, "
                         f"{time.perf_counter() - started:.0f} s")
        while self.outstanding > 0 and self.loop.now < end + self.options.tail_s:
            self.loop.run(self.loop.now + 1.0)
        finish = self.loop.now
        if self.outstanding:
            self.outcomes["unfinished"] = self.outstanding
        self.provider.finish(finish)
        self._run(asyncio.sleep(0))             # let a pending table publication finish
        for task in asyncio.all_tasks(self._aio):
            task.cancel()
        self._aio.run_until_complete(asyncio.sleep(0))
        self._aio.close()
        return self._result(total, finish - t0, base_ready, base_live, time.perf_counter() - started)

    def _result(self, total: int, duration: float, base_ready: dict, base_live: dict, wall: float) -> SimResult:
        by_model = {}
        calls = {m: 0 for m in self.config.models}
        peak: dict[str, int] = {}
        for _, counts in self.timeline:
            for m, n in counts.items():
                peak[m] = max(peak.get(m, 0), n)
        for m, spec in self.config.models.items():
            ready = self.provider.ready_s.get(m, 0.0) - base_ready.get(m, 0.0)
            live = self.provider.live_s.get(m, 0.0) - base_live.get(m, 0.0)
            h = self.call_hist[m]
            by_model[m] = {"replica_s": round(ready, 3), "live_replica_s": round(live, 3),
                           "cost": round(ready * spec.price.replica_second, 6),
                           "peak_replicas": peak.get(m, self.provider.ready_count.get(m, 0)),
                           "calls": h.n, **{k: v for k, v in h.summary().items() if k != "n"}}
        by_target = {}
        for key, c in sorted(self.counts.items()):
            h = self.hist.get(key)
            stats = h.summary() if h is not None else {}
            stats.pop("n", None)
            by_target[key] = {**c, **stats}
        answered = self.outcomes.get("answered", 0) + self.outcomes.get("degraded", 0)
        totals = {"requests": total, "answered": answered, "drops": total - answered,
                  **{k: v for k, v in self.all.summary().items() if k != "n"},
                  "replica_s": round(sum(m["replica_s"] for m in by_model.values()), 3),
                  "cost": round(sum(m["cost"] for m in by_model.values()), 6),
                  "spilled": self.router.spilled}
        return SimResult(strategy=self.options.strategy, workload=self.workload.name, duration_s=duration,
                         requests=total, outcomes=dict(sorted(self.outcomes.items())), by_target=by_target,
                         by_model=by_model, totals=totals, intervals=self.intervals, timeline=self.timeline,
                         provisioned=self.provisioned,
                         cold_starts=self.provider.cold_starts, events=self.loop.events, wall_s=wall,
                         cpu_cores=self.provider.host.cpu_cores(since=self._started_at))


def simulate(config: MeshConfig, profiles: Profiles, workload: Workload, options: SimOptions | None = None,
             progress: Callable[[str], None] | None = None) -> SimResult:
    """One run; ``static`` without counts runs ``permodel`` first and takes its peaks."""
    options = options or SimOptions()
    if options.strategy == "static" and options.static_counts is None:
        from dataclasses import replace

        from loadtest.experiment_plan import peak_counts

        first = Simulation(config, profiles, workload, replace(options, strategy="permodel")).run(progress)
        counts = peak_counts({m: v["peak_replicas"] for m, v in first.by_model.items()}, list(config.models))
        options = replace(options, static_counts=counts)
    return Simulation(config, profiles, workload, options).run(progress)
