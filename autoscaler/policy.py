"""The scaling decision for one model: a pure function of a snapshot.

Modelled on Ray Serve's ``autoscaling_policy.py`` (a context snapshot in, the
desired count and new policy state out) and Knative's ``autoscaler.go`` (``now``
is an argument; missing metrics give *no valid decision*, never a scale to
zero). The control loop builds a :class:`ScalingContext` every tick, calls
:func:`decide` and acts on the :class:`Decision`; nothing here does I/O or
reads a clock, so every rule is testable with hand-made numbers.

The steps, each a small function, in order:

1. mode — ``dedicated`` pools are a fixed size and never consult metrics;
2. validity — no (or stale) metrics: no decision (keep the current size),
   except for what needs no metrics: held requests get a first replica at
   once, and a pool outside [min, max] is moved into it;
3. idle — a serverless model with no traffic for ``idle_timeout_s`` and a
   minimum of 0 goes to zero;
4. load → replicas — ``ceil(concurrency / target_concurrency)`` for the pool
   that scales (for ``auto``, only the load beyond the dedicated pool's
   threshold capacity spills to serverless);
5. panic — the short window wanting ``panic_threshold`` x the current pool
   starts (or extends) panic; in panic the pool never shrinks;
   backlog cap — with ``autoscaler.backlog_drain_s``, scale-up goes at most
   to what the arrival rate and the queue's work over that many seconds need
   (``autoscaler.backlog``), never below the current pool;
6. rate limit — at most ``max_scale_up_rate`` x the pool's *ready* replicas
   (as Knative's ``maxScaleUpRate``; from zero: as if one were ready, so a burst
   from zero can start several at once), never below the current pool. Counting
   starting replicas too would compound: while they start, the backlog they are
   meant to serve grows, every tick wants more, and ten-fold per tick on what is
   already starting reached 690 LLM replicas for a spike that needs 60
   (``loadtest.sim_paper``, spike10x with 150 s cold starts);
7. scale-down delay — the max of this decision and those of the last
   ``scale_down_delay_s`` (a dip must last that long before it removes replicas);
   start-up hold — no scale-down while the window holds less than a full
   ``stable_window_s`` of data (``data_span_s``): averages start where the data
   starts, so a fresh autoscaler facing replicas that already serve would
   otherwise judge them on a second or two of reports, in which the load of a
   slow model (an LLM's seconds-long calls) has not built up yet, and drop
   replicas that cost a cold start to get back; step-down — with
   ``max_scale_down_rate``, a scale-down goes at most to current / rate and
   one step per stable window (each step judged on a window at the new size);
8. bounds — ``[max(min_replicas, scheduled minimum), max_replicas]``;
9. floors — a serverless model with traffic keeps one replica until it has been
   idle for ``idle_timeout_s``; held requests always get at least one; a model
   warmed (pre-warm, ``Warm``) less than ``idle_timeout_s`` ago keeps one until
   its own traffic decides (this floor holds with missing metrics too: a warm-up
   is asked for *before* any report exists).

The context itself is built in one place, :meth:`ScalingContext.from_window`:
the controller, the tests and the simulator (``sim/``) all call it, so what is
tested and what is simulated is what production runs. With graph-ahead scaling
(``autoscaler.graph_ahead``) the context also carries ``ahead_concurrency``, the
load a model's upstream arrivals predict (``autoscaler.graph_ahead``); the
policy scales to at least that, as if the load had already arrived. With
trend-ahead scaling (``autoscaler.trend``) it carries ``trend_concurrency``, a
rising load projected one cold start (``lead_s``) ahead, folded in the same way:
it only ever raises the load the policy sees, so it scales up, never down.

The decision is made per model on that model's own load (the window holds each
model separately), never on the mesh's aggregate request count, so a flood on
one model cannot scale another. :func:`uniform_contexts` builds the opposite,
for comparison only (``autoscaler.strategy: uniform``, used by
``loadtest.experiments``): every model decided on the summed load of all.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from autoscaler.backlog import drain_load, panic_rate
from autoscaler.trend import window_forecast
from cmesh.config import AutoscalerConfig, DeploymentConfig

if TYPE_CHECKING:
    from autoscaler.window import MetricsWindow

# ceil() of a quotient like 16.000000001 / 8 must not add a replica for float noise.
_EPS = 1e-9


@dataclass(frozen=True)
class ScalingContext:
    """Everything :func:`decide` may look at, frozen at one instant ``now``.

    ``current_*`` count a pool's replicas that are starting or ready (not
    draining). Loads are the model's summed concurrency (in flight + queued, in
    routers and replicas); None means no report inside that window.
    ``idle_s`` is the time since the model last had traffic (or was last
    warmed); None means unknown, which never counts as idle."""

    model: str
    spec: DeploymentConfig
    current_serverless: int
    current_dedicated: int
    stable_concurrency: float | None
    panic_concurrency: float | None
    metrics_age_s: float | None
    held: int
    idle_s: float | None
    scheduled_min: int
    now: float
    # Seconds since the model was last warmed (pre-warm, Warm request); None: never.
    warmed_s: float | None = None
    # Graph-ahead: the concurrency upstream arrivals predict for this model
    # (``autoscaler.graph_ahead.ahead_concurrency``); None: no prediction.
    ahead_concurrency: float | None = None
    # Seconds of the stable window the metrics cover (``MetricsWindow.span``);
    # less than ``stable_window_s``: too little data to scale down on. None: unknown
    # (a hand-made context), which does not hold anything.
    data_span_s: float | None = None
    # Serverless replicas ready now (``current_serverless`` less those starting);
    # None: unknown (a hand-made context): the rate limit then counts them all.
    ready_serverless: int | None = None
    # Seconds a replica asked for now takes to serve: the model's measured cold
    # start (``autoscaler.trend.expected_cold_start``); None: not known yet.
    lead_s: float | None = None
    # Trend-ahead: the concurrency a rising arrival rate projects ``lead_s``
    # ahead (``autoscaler.trend``); None: off, or no significant rise now.
    trend_concurrency: float | None = None
    # Arrivals per second over the panic window; None: no data.
    arrival_rate: float | None = None
    # The time a call spends in the system while the pool keeps up, remembered
    # by the controller (``autoscaler.backlog``); None: not measured yet.
    service_s: float | None = None

    @classmethod
    def from_window(cls, window: "MetricsWindow", model: str, spec: DeploymentConfig,
                    config: AutoscalerConfig, now: float, *, current_serverless: int,
                    current_dedicated: int, scheduled_min: int = 0,
                    touched_at: float | None = None,
                    ahead_concurrency: float | None = None,
                    ready_serverless: int | None = None,
                    lead_s: float | None = None,
                    service_s: float | None = None) -> "ScalingContext":
        """Snapshot a model from the metrics window: the one way a context is
        built (controller, tests, simulator). ``touched_at`` is the last time
        something other than traffic made the model busy (a pre-warm, a Warm
        request), so warmed replicas get a full idle timeout and the warm-up
        floor. Times are compared with ``is not None``: 0.0 is a valid instant
        (a virtual clock starts there), never "unknown". ``idle_s`` is never
        negative (a warm-up stamped a hair after ``now`` is idle 0, not -ε).
        ``lead_s`` is the model's expected cold start; with ``trend_ahead`` on,
        the trend forecast is made here, from the same window. ``service_s``
        is the remembered time in system (``autoscaler.backlog``)."""
        marks = [t for t in (window.last_traffic(model), touched_at) if t is not None]
        stable = window.average_concurrency(model, now, config.stable_window_s)
        panic = window.average_concurrency(model, now, config.panic_window_s)
        load = panic if panic is not None else stable
        rate = panic_rate(window, model, now, config.panic_window_s)
        if config.backlog_drain_s is not None and load is not None:
            # The trend projects from the flow, not from a queue (autoscaler.backlog).
            load = drain_load(load, rate=rate, service_s=service_s, horizon_s=config.backlog_drain_s)
        return cls(
            model=model, spec=spec,
            current_serverless=current_serverless, current_dedicated=current_dedicated,
            stable_concurrency=stable, panic_concurrency=panic,
            metrics_age_s=window.last_sample_age(model, now),
            held=window.held(model, now),
            idle_s=max(0.0, now - max(marks)) if marks else None,
            scheduled_min=scheduled_min, now=now,
            warmed_s=None if touched_at is None else max(0.0, now - touched_at),
            ahead_concurrency=ahead_concurrency,
            data_span_s=window.span(model, now, config.stable_window_s),
            ready_serverless=ready_serverless, lead_s=lead_s,
            trend_concurrency=window_forecast(window, model, now, config, lead_s, load,
                                              service_s if config.backlog_drain_s is not None else None),
            arrival_rate=rate, service_s=service_s)


@dataclass(frozen=True)
class PolicyState:
    """What one decision leaves for the next (per model; start with ``PolicyState()``)."""

    panic_until: float | None = None     # in panic while now < panic_until
    panic_peak: int = 0                  # largest pool wanted during this panic
    # (time, desired) of recent decisions, kept as a monotonic max-queue: the
    # head is the max over the scale-down delay window, and the queue stays
    # short however long the delay is.
    recent: tuple[tuple[float, int], ...] = field(default_factory=tuple)
    last_down: float | None = None       # the last scale-down step (max_scale_down_rate)

    def in_panic(self, now: float) -> bool:
        return self.panic_until is not None and now < self.panic_until


@dataclass(frozen=True)
class Decision:
    desired_dedicated: int
    desired_serverless: int
    panic: bool
    reason: str
    # False: no decision (missing or stale metrics, nothing else to go on);
    # the caller keeps the current pools, and the desired counts equal them.
    # Floors and caps that need no metrics (min/scheduled replicas, max, held
    # requests) still give a valid decision.
    valid: bool = True

    @property
    def total(self) -> int:
        return self.desired_dedicated + self.desired_serverless


def decide(ctx: ScalingContext, config: AutoscalerConfig,
           state: PolicyState | None = None) -> tuple[Decision, PolicyState]:
    """The desired pool sizes for ``ctx.model`` and the policy state for next time."""
    state = state or PolicyState()
    spec = ctx.spec
    if spec.mode == "dedicated":
        n = spec.dedicated_replicas
        return Decision(n, 0, False, f"dedicated: fixed pool of {n}"), PolicyState()

    dedicated = spec.dedicated_replicas if spec.mode == "auto" else 0
    lo, hi, lo_why = _bounds(ctx)
    current = ctx.current_serverless
    # Held requests wait for *a* replica: one is needed at once unless a
    # dedicated replica exists (it is starting; a serverless one would be no sooner).
    needs_first = ctx.held > 0 and ctx.current_dedicated == 0 and hi >= 1

    stale = _staleness(ctx, config)
    if stale is not None:
        panic = state.in_panic(ctx.now)
        if needs_first and current < 1:
            return Decision(dedicated, 1, panic, f"held {ctx.held} → 1 ({stale})"), state
        if _warming(ctx) and current < 1 and dedicated == 0 and hi >= 1:
            return Decision(dedicated, 1, panic, f"warmed {ctx.warmed_s:.0f}s ago → 1 ({stale})"), state
        keep = _clamp(current, lo, hi)
        if keep != current:
            # Bounds need no metrics: provisioned (or scheduled) replicas start,
            # and a lowered max applies, even before the first report.
            why = f"min {lo}{lo_why}" if keep > current else f"max {hi}"
            return Decision(dedicated, keep, panic, f"{stale}; {why}"), state
        return Decision(dedicated, current, panic, stale, valid=False), state

    if spec.mode == "serverless" and lo == 0 and _idle(ctx):
        # Idle long enough: to zero whatever the lingering averages say (the
        # stable window may be longer than the idle timeout). Held requests
        # never count as idle. A fresh start for panic and delay state.
        return Decision(0, 0, False, f"idle {ctx.idle_s:.0f}s → 0"), PolicyState()

    recent = ctx.panic_concurrency if ctx.panic_concurrency is not None else ctx.stable_concurrency or 0.0
    stable_load, panic_load = _pool_load(ctx.stable_concurrency or 0.0, spec), _pool_load(recent, spec)
    # Backlog-aware: what scale-up may ask for, a queue counted as its work over
    # backlog_drain_s rather than as concurrency (autoscaler.backlog).
    drained = _pool_load(drain_load(recent, rate=ctx.arrival_rate, service_s=ctx.service_s,
                                    horizon_s=config.backlog_drain_s), spec)
    if ctx.ahead_concurrency is not None:
        # Graph-ahead: what upstream arrivals say is on its way counts as load
        # already here, in both windows (it is a short-horizon forecast).
        ahead = _pool_load(ctx.ahead_concurrency, spec)
        stable_load, panic_load = max(stable_load, ahead), max(panic_load, ahead)
        drained = max(drained, ahead)
    trend_note = ""
    if ctx.trend_concurrency is not None:
        # Trend-ahead: what a rising load will be once a replica asked for now
        # serves. A floor under both windows' loads, so it can only scale up.
        trend = _pool_load(ctx.trend_concurrency, spec)
        if trend > panic_load:
            trend_note = f" (trend: {trend:.1f} in {ctx.lead_s or 0:.0f}s)"
        stable_load, panic_load = max(stable_load, trend), max(panic_load, trend)
        drained = max(drained, trend)
    want_stable = _replicas(stable_load, spec.target_concurrency)
    want_panic = _replicas(panic_load, spec.target_concurrency)

    desired, state, reason = _panic_step(ctx, config, state, want_stable, want_panic, stable_load, panic_load)
    reason += trend_note
    if config.backlog_drain_s is not None:
        desired, note = _backlog_cap(desired, current, _replicas(drained, spec.target_concurrency), ctx,
                                     config.backlog_drain_s)
        reason += note
    ready = current if ctx.ready_serverless is None else min(current, ctx.ready_serverless)
    desired, note = _rate_limit(desired, current, ready, config.max_scale_up_rate)
    reason += note
    desired, state, note = _delay_step(desired, ctx.now, config.scale_down_delay_s, state)
    reason += note
    desired, note = _startup_hold(desired, ctx, config.stable_window_s)
    reason += note
    desired, state, note = _step_down(desired, ctx, config, state)
    reason += note
    bounded = _clamp(desired, lo, hi)
    if bounded > desired:
        reason += f" (min {lo}{lo_why})"
    elif bounded < desired:
        reason += f" (max {hi})"

    if spec.mode == "serverless" and bounded == 0 and current > 0:
        # Load fell to nothing but the model is not idle long enough: keep one
        # warm replica so the next request does not pay a cold start.
        idle = "no traffic yet" if ctx.idle_s is None else f"idle {ctx.idle_s:.0f}s"
        bounded, reason = 1, f"{reason}; {idle} of {spec.idle_timeout_s:g}s → keep 1"
    if needs_first and bounded < 1:
        bounded, reason = 1, f"held {ctx.held} → 1"
    if _warming(ctx) and bounded + dedicated < 1 and hi >= 1:
        # Warm-up floor: a model warmed ahead of its traffic keeps one replica
        # until the idle timeout passes or its own load decides.
        bounded, reason = 1, f"{reason}; warmed {ctx.warmed_s:.0f}s ago → keep 1"
    return Decision(dedicated, bounded, state.in_panic(ctx.now), reason), state


# ----------------------------------------------------------------- the steps


def _staleness(ctx: ScalingContext, config: AutoscalerConfig) -> str | None:
    """Why there is no metric-based decision, or None when the data is usable."""
    if ctx.metrics_age_s is None or ctx.stable_concurrency is None:
        return "no metrics"
    if ctx.metrics_age_s > config.stale_after_s:
        return f"stale metrics ({ctx.metrics_age_s:.1f}s old)"
    return None


def _warming(ctx: ScalingContext) -> bool:
    """Warmed less than an idle timeout ago: the warm-up floor applies."""
    return ctx.warmed_s is not None and ctx.warmed_s < ctx.spec.idle_timeout_s


def _idle(ctx: ScalingContext) -> bool:
    # Unknown idleness (None) is not idleness: never to zero on missing data.
    return ctx.idle_s is not None and ctx.idle_s >= ctx.spec.idle_timeout_s and ctx.held == 0


def _pool_load(concurrency: float, spec: DeploymentConfig) -> float:
    """The load the serverless pool must carry: all of it, or (``auto``) what
    exceeds the dedicated pool's capacity at its threshold, which is exactly
    when the router starts spilling."""
    if spec.mode != "auto":
        return concurrency
    capacity = spec.dedicated_replicas * spec.target_concurrency * spec.capacity_threshold
    return max(0.0, concurrency - capacity)


def _replicas(load: float, target: float) -> int:
    return max(0, math.ceil(load / target - _EPS))


def _panic_step(ctx: ScalingContext, config: AutoscalerConfig, state: PolicyState,
                want_stable: int, want_panic: int, stable_load: float,
                panic_load: float) -> tuple[int, PolicyState, str]:
    current = ctx.current_serverless
    target = f"{ctx.spec.target_concurrency:g}"
    what = "beyond dedicated capacity" if ctx.spec.mode == "auto" else "in flight"
    # Knative: compare against at least one replica, so going 0 → 2+ at once is a burst.
    triggered = want_panic >= config.panic_threshold * max(1, current)
    was_in_panic = state.in_panic(ctx.now)
    if triggered:
        state = replace(state, panic_until=ctx.now + config.stable_window_s)
    if triggered or was_in_panic:
        # In panic the pool never shrinks: a burst that eased for a second is
        # likely to come back, and removing replicas mid-burst costs cold starts.
        peak = max(want_panic, current, state.panic_peak if was_in_panic else 0)
        state = replace(state, panic_peak=peak)
        left = state.panic_until - ctx.now if state.panic_until is not None else 0.0
        return peak, state, (f"panic: {panic_load:.1f} {what} / {target} per replica → {want_panic}, "
                             f"holding {peak} for {left:.0f}s")
    state = replace(state, panic_until=None, panic_peak=0)
    return want_stable, state, f"stable: {stable_load:.1f} {what} / {target} per replica → {want_stable}"


def _backlog_cap(desired: int, current: int, want: int, ctx: ScalingContext,
                 drain_s: float) -> tuple[int, str]:
    """Scale up at most to what the flow and the queue's work over ``drain_s``
    need (``want``), never below the current pool: it only slows scale-up."""
    if desired <= current or want >= desired:
        return desired, ""
    capped = max(current, want)
    return capped, (f" (backlog: {ctx.panic_concurrency or 0:.1f} in the system is mostly queue; "
                    f"its work over {drain_s:g}s needs {want} → {capped})")


def _rate_limit(desired: int, current: int, ready: int, rate: float) -> tuple[int, str]:
    limit = max(current, math.ceil(rate * max(1, ready) - _EPS))
    if desired > limit:
        return limit, f" (scale-up limit {limit})"
    return desired, ""


def _delay_step(desired: int, now: float, delay_s: float,
                state: PolicyState) -> tuple[int, PolicyState, str]:
    recent = [(t, v) for t, v in state.recent if t > now - delay_s]
    while recent and recent[-1][1] <= desired:
        recent.pop()                 # dominated: newer and not larger can never be the max again
    recent.append((now, desired))
    state = replace(state, recent=tuple(recent))
    held = recent[0][1]
    if held > desired:
        return held, state, f" (scale-down delay keeps {held})"
    return desired, state, ""


def _startup_hold(desired: int, ctx: ScalingContext, window_s: float) -> tuple[int, str]:
    """Less than a full stable window of data: never below the current pool
    (scaling up goes on; bounds and the idle rule still apply)."""
    span = ctx.data_span_s
    if span is None or span >= window_s - _EPS or desired >= ctx.current_serverless:
        return desired, ""
    return ctx.current_serverless, (f" (start-up: {span:.0f}s of {window_s:g}s of data, "
                                    f"keeps {ctx.current_serverless})")


def _step_down(desired: int, ctx: ScalingContext, config: AutoscalerConfig,
               state: PolicyState) -> tuple[int, PolicyState, str]:
    """``max_scale_down_rate``: shrink by at most that factor, one step per stable
    window. A model whose latency grows with its batch (an LLM) shows less
    concurrency on a large pool than it will on a small one, so one jump to
    what a large pool measured undershoots; each step is judged on a full
    window of data at the new size."""
    rate, current = config.max_scale_down_rate, ctx.current_serverless
    if rate is None or desired >= current:
        return desired, state, ""
    if state.last_down is not None and ctx.now - state.last_down < config.stable_window_s - _EPS:
        return current, state, f" (step-down: next step {config.stable_window_s - (ctx.now - state.last_down):.0f}s)"
    floor = math.ceil(current / rate - _EPS)
    state = replace(state, last_down=ctx.now)
    if floor > desired:
        return floor, state, f" (step-down to {floor})"
    return desired, state, ""


def _bounds(ctx: ScalingContext) -> tuple[int, int, str]:
    """[lo, hi] for the serverless pool, and why lo is what it is."""
    spec = ctx.spec
    if spec.mode == "auto":
        # max_replicas counts both pools; a schedule's minimum counts every
        # replica of the model, so the dedicated pool already covers part of it.
        hi = max(0, spec.max_replicas - spec.dedicated_replicas)
        scheduled = max(0, ctx.scheduled_min - spec.dedicated_replicas)
    else:
        hi = spec.max_replicas
        scheduled = ctx.scheduled_min
    lo = min(max(spec.min_replicas, scheduled), hi)
    why = ", scheduled" if scheduled > spec.min_replicas and lo > 0 else ""
    return lo, hi, why


def _clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, n))


def uniform_contexts(contexts: Mapping[str, ScalingContext], target: float) -> dict[str, ScalingContext]:
    """The *uniform* baseline: every model sees the mesh's aggregate load.

    Each model's context gets the summed stable and panic concurrency and held
    requests of all models, the freshest metrics age, the shortest idle time
    (the mesh is idle only when every model is) and ``target`` as its target
    concurrency, so :func:`decide` gives every model the same count (within its
    own bounds): how a monolith, or a pipeline deployed as one unit, scales.
    Models without metrics add nothing; no model with metrics: no decision."""
    def total(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return sum(known) if known else None

    def least(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return min(known) if known else None

    ctxs = list(contexts.values())
    stable = total([c.stable_concurrency for c in ctxs])
    panic = total([c.panic_concurrency for c in ctxs])
    age = least([c.metrics_age_s for c in ctxs])
    idle = least([c.idle_s for c in ctxs])
    held = sum(c.held for c in ctxs)
    return {m: replace(c, spec=c.spec.model_copy(update={"target_concurrency": target}),
                       stable_concurrency=stable, panic_concurrency=panic, metrics_age_s=age,
                       idle_s=idle, held=held)
            for m, c in contexts.items()}
