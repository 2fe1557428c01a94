"""The scaling policy: a pure function of a snapshot, tested with hand-made numbers."""
from dataclasses import replace

import pytest

from autoscaler.policy import Decision, PolicyState, ScalingContext, decide
from autoscaler.window import MetricsWindow
from cmesh.config import AutoscalerConfig, DeploymentConfig

CFG = AutoscalerConfig()   # stable 60 s, panic 6 s, threshold 2x, up-rate 10x, no delay, stale 5 s


def serverless(**kw) -> DeploymentConfig:
    return DeploymentConfig(**{"mode": "serverless", "min_replicas": 0, "max_replicas": 20,
                               "target_concurrency": 8, "idle_timeout_s": 300, **kw})


def ctx(spec: DeploymentConfig | None = None, *, load: float | None = 0.0, panic: float | None = None,
        current: int = 0, dedicated: int = 0, age: float | None = 1.0, held: int = 0,
        idle: float | None = 0.0, scheduled: int = 0, now: float = 1000.0) -> ScalingContext:
    return ScalingContext(model="m", spec=spec or serverless(), current_serverless=current,
                          current_dedicated=dedicated, stable_concurrency=load,
                          panic_concurrency=load if panic is None else panic, metrics_age_s=age,
                          held=held, idle_s=idle, scheduled_min=scheduled, now=now)


def run(c: ScalingContext, state: PolicyState | None = None, config: AutoscalerConfig = CFG) -> Decision:
    return decide(c, config, state)[0]


# ------------------------------------------------------------------ stable


def test_stable_scaling_is_ceil_of_load_over_target() -> None:
    d = run(ctx(load=37.0, current=4))
    assert (d.desired_dedicated, d.desired_serverless, d.panic, d.valid) == (0, 5, False, True)
    assert d.reason == "stable: 37.0 in flight / 8 per replica → 5"


def test_exact_multiple_does_not_round_up_on_float_noise() -> None:
    assert run(ctx(load=16.000000000001, current=2)).desired_serverless == 2


def test_stable_scale_down_without_delay() -> None:
    assert run(ctx(load=9.0, current=6)).desired_serverless == 2


# ------------------------------------------------------------------- panic


def test_burst_in_the_short_window_starts_panic() -> None:
    d = run(ctx(load=20.0, panic=80.0, current=2))       # panic wants 10 >= 2 x 2
    assert d.panic and d.desired_serverless == 10
    assert d.reason.startswith("panic")


def test_short_window_below_threshold_is_not_panic() -> None:
    d = run(ctx(load=20.0, panic=24.0, current=2))       # wants 3 < 2 x 2
    assert not d.panic and d.desired_serverless == 3


def test_no_scale_down_in_panic_and_panic_lasts_a_stable_window() -> None:
    d, state = decide(ctx(load=20.0, panic=80.0, current=2, now=0.0), CFG, PolicyState())
    assert d.panic and d.desired_serverless == 10
    # The burst eased: both windows now want 1, but panic holds the pool.
    d, state = decide(ctx(load=8.0, panic=8.0, current=10, now=30.0), CFG, state)
    assert d.panic and d.desired_serverless == 10
    d, state = decide(ctx(load=8.0, panic=8.0, current=10, now=59.0), CFG, state)
    assert d.panic and d.desired_serverless == 10
    # A stable window after the last trigger, panic ends and the pool shrinks.
    d, state = decide(ctx(load=8.0, panic=8.0, current=10, now=60.5), CFG, state)
    assert not d.panic and d.desired_serverless == 1


def test_a_new_trigger_extends_panic() -> None:
    _, state = decide(ctx(load=20.0, panic=80.0, current=2, now=0.0), CFG, PolicyState())
    d, state = decide(ctx(load=40.0, panic=200.0, current=10, now=40.0), CFG, state)   # 25 >= 2 x 10
    assert d.panic and d.desired_serverless == 20
    d, state = decide(ctx(load=8.0, panic=8.0, current=20, now=90.0), CFG, state)
    assert d.panic and d.desired_serverless == 20      # 50 s after the last trigger


def test_panic_from_zero() -> None:
    d = run(ctx(load=10.0, panic=30.0, current=0))        # wants 4 >= 2 x max(1, 0)
    assert d.panic and d.desired_serverless == 4


# ------------------------------------------------- missing and stale metrics


@pytest.mark.parametrize("kw, why", [
    ({"load": None, "age": None}, "no metrics"),
    ({"load": None, "age": 1.0}, "no metrics"),
    ({"load": 0.0, "age": None}, "no metrics"),
    ({"load": 0.0, "age": 12.5}, "stale metrics (12.5s old)"),
])
def test_missing_or_stale_metrics_give_no_decision_and_never_zero(kw, why) -> None:
    d, state = decide(ctx(current=3, idle=10_000.0, **kw), CFG, PolicyState())
    assert not d.valid and d.reason == why
    assert d.desired_serverless == 3                      # keep current, never to zero
    assert state == PolicyState()


def test_no_metrics_still_respects_bounds() -> None:
    # Provisioned replicas start before the first report; a lowered max applies.
    d = run(ctx(serverless(min_replicas=2), load=None, age=None, current=0))
    assert (d.desired_serverless, d.valid, d.reason) == (2, True, "no metrics; min 2")
    d = run(ctx(serverless(max_replicas=2), load=None, age=None, current=5))
    assert (d.desired_serverless, d.valid, d.reason) == (2, True, "no metrics; max 2")
    d = run(ctx(serverless(min_replicas=1), load=None, age=None, current=0, scheduled=3))
    assert (d.desired_serverless, d.valid) == (3, True) and "scheduled" in d.reason
    d = run(ctx(serverless(min_replicas=2), load=None, age=None, current=3))
    assert (d.desired_serverless, d.valid) == (3, False)


def test_stale_data_keeps_panic_state() -> None:
    _, state = decide(ctx(load=20.0, panic=80.0, current=2, now=0.0), CFG, PolicyState())
    d, state2 = decide(ctx(load=0.0, age=30.0, current=10, now=10.0), CFG, state)
    assert not d.valid and d.panic and state2 == state


# ------------------------------------------------------------ idle and held


def test_idle_to_zero_only_after_idle_timeout() -> None:
    before = run(ctx(load=0.0, current=2, idle=299.0))
    assert before.desired_serverless == 1 and "keep 1" in before.reason
    after = run(ctx(load=0.0, current=2, idle=312.0))
    assert after.desired_serverless == 0 and after.reason == "idle 312s → 0"


def test_idle_wins_over_a_lingering_average() -> None:
    # idle_timeout_s shorter than the stable window: old load still in the average.
    d = run(ctx(serverless(idle_timeout_s=10), load=5.0, panic=0.0, current=1, idle=12.0))
    assert d.desired_serverless == 0


def test_unknown_idleness_never_scales_to_zero() -> None:
    assert run(ctx(load=0.0, current=1, idle=None)).desired_serverless == 1


def test_idle_does_not_go_below_min() -> None:
    d = run(ctx(serverless(min_replicas=1), load=0.0, current=3, idle=10_000.0))
    assert d.desired_serverless == 1


def test_zero_stays_zero_without_traffic() -> None:
    assert run(ctx(load=0.0, current=0, idle=5.0)).desired_serverless == 0


def test_held_requests_get_a_first_replica_at_once() -> None:
    d = run(ctx(load=0.0, current=0, held=3, idle=0.0))
    assert (d.desired_serverless, d.valid) == (1, True) and d.reason == "held 3 → 1"


def test_held_requests_get_a_replica_even_without_metrics() -> None:
    for kw in ({"load": None, "age": None}, {"load": 0.0, "age": 60.0}):
        d = run(ctx(current=0, held=2, **kw))
        assert (d.desired_serverless, d.valid) == (1, True)
        assert d.reason.startswith("held 2 → 1")


def test_held_with_real_load_scales_past_one() -> None:
    assert run(ctx(load=24.0, panic=24.0, current=0, held=24)).desired_serverless == 3


# -------------------------------------------------------------- bounds


def test_max_caps() -> None:
    d = run(ctx(serverless(max_replicas=4), load=1000.0, panic=1000.0, current=4))
    assert d.desired_serverless == 4 and "(max 4)" in d.reason


def test_min_and_scheduled_min() -> None:
    d = run(ctx(serverless(min_replicas=2), load=0.0, current=2, idle=10_000.0))
    assert d.desired_serverless == 2
    d = run(ctx(serverless(min_replicas=1), load=0.0, current=1, idle=10_000.0, scheduled=3))
    assert d.desired_serverless == 3 and "min 3, scheduled" in d.reason
    # A schedule never lifts a pool past its max.
    assert run(ctx(serverless(max_replicas=2), load=0.0, scheduled=5)).desired_serverless == 2


# ------------------------------------------------------------ rate limit


def test_scale_up_is_rate_limited() -> None:
    d = run(ctx(load=400.0, current=2))                   # wants 50, at most 10 x 2
    assert d.desired_serverless == 20 and "scale-up limit 20" in d.reason
    d = run(ctx(load=400.0, current=0))                   # from zero: as if from one
    assert d.desired_serverless == 10
    slow = AutoscalerConfig(max_scale_up_rate=1.5)
    assert run(ctx(load=400.0, current=0), config=slow).desired_serverless == 2   # at least +1


def test_the_rate_limit_counts_ready_replicas_not_starting_ones() -> None:
    big = serverless(max_replicas=500)
    # 2 ready and 18 starting: a backlog that grows while they start must not
    # compound the limit (10 x 20 next tick, 10 x 200 the one after).
    starting = replace(ctx(big, load=4000.0, current=20), ready_serverless=2)
    d = run(starting)
    assert d.desired_serverless == 20 and "scale-up limit 20" in d.reason
    # Never below what is already there, however few are ready.
    assert run(replace(ctx(big, load=4000.0, current=50), ready_serverless=2)).desired_serverless == 50
    # Once they are ready the next step may go ten-fold again.
    assert run(replace(ctx(big, load=4000.0, current=20), ready_serverless=20)).desired_serverless == 200
    # From zero ready (all still starting): as if one were ready.
    assert run(replace(ctx(big, load=4000.0, current=0), ready_serverless=0)).desired_serverless == 10


def test_the_controller_passes_the_ready_count() -> None:
    import asyncio

    from autoscaler.controller import Controller
    from cmesh.config import MeshConfig
    from tests.test_autoscaler_controller import FakeProvider

    config = MeshConfig.model_validate({"store": "/nonexistent", "models": {
        "m": {"source": "store://x/1", "engine": "identity", "deployment": {"mode": "serverless"}}}})
    provider = FakeProvider()
    ctl = Controller(config, provider, clock=lambda: 0.0, wall=lambda: 1.7e9)
    asyncio.run(provider.scale("m", "serverless", 3, []))
    provider.handles[0].state = "warming"
    c = ctl._context("m", 1.0, 0)
    assert c.current_serverless == 3 and c.ready_serverless == 2


# ------------------------------------------------------- scale-down delay


def test_scale_down_delay_keeps_the_recent_max() -> None:
    cfg = AutoscalerConfig(scale_down_delay_s=30)
    d, s = decide(ctx(load=40.0, current=5, now=0.0), cfg, PolicyState())
    assert d.desired_serverless == 5
    d, s = decide(ctx(load=8.0, current=5, now=10.0), cfg, s)
    assert d.desired_serverless == 5 and "scale-down delay keeps 5" in d.reason
    d, s = decide(ctx(load=16.0, current=5, now=20.0), cfg, s)
    assert d.desired_serverless == 5
    d, s = decide(ctx(load=16.0, current=5, now=31.0), cfg, s)
    assert d.desired_serverless == 2                       # the 5 is older than 30 s; the 2 from t=20 holds
    d, s = decide(ctx(load=8.0, current=2, now=61.5), cfg, s)     # the 2 from t=31 has aged out
    assert d.desired_serverless == 1
    assert len(s.recent) <= 3                              # a max-queue, not a log


def test_scale_up_is_not_delayed() -> None:
    cfg = AutoscalerConfig(scale_down_delay_s=300)
    _, s = decide(ctx(load=8.0, current=1, now=0.0), cfg, PolicyState())
    d, _ = decide(ctx(load=24.0, panic=24.0, current=1, now=1.0), cfg, s)
    assert d.desired_serverless == 3


# ------------------------------------------------------------------ modes


def test_dedicated_pool_is_fixed() -> None:
    spec = DeploymentConfig(mode="dedicated", dedicated_replicas=2, max_replicas=4)
    for kw in ({"load": 1000.0}, {"load": 0.0, "idle": 1e6}, {"load": None, "age": None}):
        d = run(ctx(spec, dedicated=2, **kw))
        assert (d.desired_dedicated, d.desired_serverless, d.valid) == (2, 0, True)


def auto(**kw) -> DeploymentConfig:
    return DeploymentConfig(**{"mode": "auto", "dedicated_replicas": 1, "capacity_threshold": 0.8,
                               "max_replicas": 3, "target_concurrency": 8, **kw})


def test_auto_spills_only_beyond_threshold_capacity() -> None:
    # Dedicated capacity at threshold: 1 x 8 x 0.8 = 6.4 in flight.
    d = run(ctx(auto(), load=6.0, current=0, dedicated=1))
    assert (d.desired_dedicated, d.desired_serverless) == (1, 0)
    d = run(ctx(auto(), load=10.0, current=1, dedicated=1))           # 3.6 beyond → 1
    assert (d.desired_dedicated, d.desired_serverless) == (1, 1)
    assert "beyond dedicated capacity" in d.reason
    d = run(ctx(auto(), load=20.0, current=1, dedicated=1))           # 13.6 beyond → 2
    assert d.desired_serverless == 2
    d = run(ctx(auto(), load=500.0, panic=500.0, current=2, dedicated=1))
    assert d.desired_serverless == 2                                   # max 3 - 1 dedicated


def test_auto_spill_pool_follows_load_down_without_idle_wait() -> None:
    # The model is busy on its dedicated pool: its idle clock never runs, so
    # the spill pool must shrink on load alone.
    d = run(ctx(auto(), load=3.0, current=2, dedicated=1, idle=0.0))
    assert (d.desired_dedicated, d.desired_serverless) == (1, 0)


def test_auto_schedule_counts_the_dedicated_pool() -> None:
    assert run(ctx(auto(), load=0.0, dedicated=1, scheduled=1)).desired_serverless == 0
    assert run(ctx(auto(), load=0.0, dedicated=1, scheduled=3)).desired_serverless == 2


def test_auto_held_waits_for_the_dedicated_replica() -> None:
    assert run(ctx(auto(), load=None, age=None, dedicated=1, held=4)).desired_serverless == 0
    assert run(ctx(auto(), load=None, age=None, dedicated=0, held=4)).desired_serverless == 1


# --------------------------------------------------- per-model independence


def test_a_flood_on_one_model_does_not_scale_another() -> None:
    window = MetricsWindow(CFG.stable_window_s, source_ttl_s=CFG.stale_after_s)
    for t in range(60):
        window.add("a", float(t), 400.0, arrivals=1000, source="r1")
        window.add("b", float(t), 3.0, arrivals=2, source="r1")
    now = 59.5
    states = {}
    out = {}
    for model in ("a", "b"):
        c = ScalingContext.from_window(window, model, serverless(), CFG, now,
                                       current_serverless=1, current_dedicated=0)
        out[model], states[model] = decide(c, CFG, None)
    assert out["a"].desired_serverless == 10          # rate-limited from 1
    assert out["b"].desired_serverless == 1
    assert not out["b"].panic


def test_from_window_snapshot() -> None:
    window = MetricsWindow(60, source_ttl_s=5)
    window.add("m", 10.0, 4.0, held=2, source="r1")
    window.add("m", 10.5, 0.0, source="r2")
    c = ScalingContext.from_window(window, "m", serverless(), CFG, 11.0, current_serverless=0,
                                   current_dedicated=0, scheduled_min=1, touched_at=3.0)
    assert c.held == 2 and c.metrics_age_s == pytest.approx(0.5) and c.idle_s == pytest.approx(1.0)
    assert c.stable_concurrency == pytest.approx(4.0) and c.scheduled_min == 1
    none = ScalingContext.from_window(window, "other", serverless(), CFG, 11.0, current_serverless=1,
                                      current_dedicated=0)
    assert none.stable_concurrency is None and none.idle_s is None
    assert not decide(none, CFG)[0].valid


def test_decide_is_pure() -> None:
    c = ctx(load=20.0, panic=80.0, current=2)
    s = PolicyState()
    first = decide(c, CFG, s)
    assert decide(c, CFG, s) == first and s == PolicyState()
    assert replace(c, now=c.now) == c


# ------------------------------------------------- uniform (baseline only)


def test_uniform_scales_every_model_on_the_aggregate_load() -> None:
    from autoscaler.policy import uniform_contexts

    contexts = {"hot": replace(ctx(load=60.0, current=1), model="hot"),
                "cold": replace(ctx(load=0.0, current=1, idle=500.0), model="cold"),
                "unseen": replace(ctx(load=None, age=None, idle=None, current=1), model="unseen")}
    uniform = uniform_contexts(contexts, target=16.0)
    # 60 in flight over everything / 16 per replica -> 4 replicas of *every* model,
    # the idle one included (the mesh is busy), and one without metrics of its own.
    assert {m: run(c).desired_serverless for m, c in uniform.items()} == {"hot": 4, "cold": 4, "unseen": 4}
    # Per model, the same loads give 8 (60 / 8 per replica), 0 (idle) and no decision.
    per_model = {m: run(c) for m, c in contexts.items()}
    assert per_model["hot"].desired_serverless == 8 and per_model["cold"].desired_serverless == 0
    assert not per_model["unseen"].valid


def test_uniform_goes_to_zero_only_when_the_whole_mesh_is_idle() -> None:
    from autoscaler.policy import uniform_contexts

    busy = {"a": replace(ctx(load=0.0, idle=400.0, current=1), model="a"),
            "b": replace(ctx(load=2.0, idle=0.0, current=1), model="b")}
    assert all(run(c).desired_serverless == 1 for c in uniform_contexts(busy, 16.0).values())
    idle = {m: replace(c, idle_s=400.0, stable_concurrency=0.0, panic_concurrency=0.0) for m, c in busy.items()}
    assert all(run(c).desired_serverless == 0 for c in uniform_contexts(idle, 16.0).values())
    none = {m: replace(c, stable_concurrency=None, panic_concurrency=None, metrics_age_s=None)
            for m, c in busy.items()}
    assert not any(run(c).valid for c in uniform_contexts(none, 16.0).values())


# ------------------------------------------------------- start-up hold


def _fresh_window(seconds: int, concurrency: float, start: float = 1000.0) -> MetricsWindow:
    """A fresh autoscaler's window: ``seconds`` of one router's reports."""
    window = MetricsWindow(CFG.stable_window_s, source_ttl_s=CFG.stale_after_s)
    for t in range(seconds):
        window.add("m", start + t, concurrency, arrivals=5, source="r1")
    return window


def test_from_window_carries_the_data_span() -> None:
    window = _fresh_window(3, 4.0)
    c = ScalingContext.from_window(window, "m", serverless(), CFG, 1002.5, current_serverless=6,
                                   current_dedicated=0)
    assert c.data_span_s == pytest.approx(2.5)
    full = _fresh_window(200, 4.0)
    c = ScalingContext.from_window(full, "m", serverless(), CFG, 1199.5, current_serverless=6,
                                   current_dedicated=0)
    assert c.data_span_s == pytest.approx(CFG.stable_window_s)


def test_a_fresh_autoscaler_does_not_drop_running_replicas_on_its_first_reports() -> None:
    # Six replicas already serve (a restart, a simulation that starts mid-traffic);
    # the first two seconds of reports show load still building up (slow calls).
    window = _fresh_window(2, 9.0)
    c = ScalingContext.from_window(window, "m", serverless(), CFG, 1001.5, current_serverless=6,
                                   current_dedicated=0)
    d, state = decide(c, CFG, PolicyState())
    assert d.valid and d.desired_serverless == 6 and "start-up" in d.reason
    # Once a full stable window of data says 9 in flight, the pool follows it down.
    window = _fresh_window(62, 9.0)
    c = ScalingContext.from_window(window, "m", serverless(), CFG, 1061.5, current_serverless=6,
                                   current_dedicated=0)
    d, _ = decide(c, CFG, state)
    assert d.desired_serverless == 2 and "start-up" not in d.reason


def test_the_start_up_hold_never_blocks_scaling_up_or_the_bounds() -> None:
    window = _fresh_window(2, 80.0)
    c = ScalingContext.from_window(window, "m", serverless(), CFG, 1001.5, current_serverless=6,
                                   current_dedicated=0)
    assert decide(c, CFG)[0].desired_serverless == 10
    capped = ScalingContext.from_window(window, "m", serverless(max_replicas=4), CFG, 1001.5,
                                        current_serverless=6, current_dedicated=0)
    assert decide(capped, CFG)[0].desired_serverless == 4            # a lowered max still applies


def test_the_start_up_hold_needs_a_span_and_a_hand_made_context_has_none() -> None:
    assert run(ctx(load=9.0, current=6)).desired_serverless == 2     # data_span_s None: no hold
    held = replace(ctx(load=9.0, current=6), data_span_s=30.0)
    assert run(held).desired_serverless == 6
    assert run(replace(held, data_span_s=60.0)).desired_serverless == 2
    # Idle long enough still goes to zero (held requests and idleness need no averages).
    idle = replace(ctx(load=0.0, current=6, idle=400.0), data_span_s=1.0)
    assert run(idle).desired_serverless == 0


# ---------------------------------------------------- step-wise scale-down


def test_step_down_halves_at_most_once_per_stable_window() -> None:
    cfg = AutoscalerConfig(max_scale_down_rate=2.0)
    state = PolicyState()
    d, state = decide(ctx(load=16.0, current=40, now=0.0), cfg, state)       # wants 2
    assert d.desired_serverless == 20 and "step-down to 20" in d.reason
    d, state = decide(ctx(load=16.0, current=20, now=30.0), cfg, state)      # too soon for the next step
    assert d.desired_serverless == 20 and "next step" in d.reason
    d, state = decide(ctx(load=16.0, current=20, now=60.0), cfg, state)
    assert d.desired_serverless == 10
    d, state = decide(ctx(load=72.0, current=10, now=120.0), cfg, state)     # wants 9: within the step
    assert d.desired_serverless == 9


def test_step_down_never_slows_scaling_up_or_idling_to_zero() -> None:
    cfg = AutoscalerConfig(max_scale_down_rate=2.0)
    _, state = decide(ctx(load=16.0, current=40, now=0.0), cfg, PolicyState())
    assert decide(ctx(serverless(max_replicas=50), load=200.0, current=20, now=1.0), cfg,
                  state)[0].desired_serverless == 25
    assert decide(ctx(load=0.0, current=20, idle=400.0, now=2.0), cfg, state)[0].desired_serverless == 0
    # Off by default: straight to what the load wants.
    assert run(ctx(load=16.0, current=40)).desired_serverless == 2
