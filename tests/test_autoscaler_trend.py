"""Trend-ahead scaling: a rising arrival rate projected one cold start ahead (scale up only)."""
import asyncio

import numpy as np
import pytest

from autoscaler.controller import Controller
from autoscaler.policy import PolicyState, ScalingContext, decide
from autoscaler.trend import Trend, expected_cold_start, fit, forecast, window_forecast
from autoscaler.window import MetricsWindow
from cmesh.config import AutoscalerConfig, DeploymentConfig, MeshConfig
from protos import mesh_pb2
from tests.test_autoscaler_controller import FakeProvider

ON = AutoscalerConfig(trend_ahead=True)        # stable 60 s, panic 6 s, up-rate 10x, z 3
OFF = AutoscalerConfig()
SPEC = DeploymentConfig(mode="serverless", max_replicas=200, target_concurrency=8, idle_timeout_s=300)
W = 4.0                                        # seconds a call spends (Little: concurrency = rate x W)


def window_of(rates, w: float = W) -> MetricsWindow:
    """One report a second: ``rates[i]`` arrivals at second i, ``rate x W`` in flight."""
    window = MetricsWindow(60, source_ttl_s=5)
    for i, r in enumerate(rates):
        window.add("m", float(i), concurrency=r * w, arrivals=int(round(r)), source="r")
    return window


def context(window: MetricsWindow, now: float, config: AutoscalerConfig, current: int,
            lead_s: float | None = 30.0) -> ScalingContext:
    return ScalingContext.from_window(window, "m", SPEC, config, now, current_serverless=current,
                                      current_dedicated=0, ready_serverless=current, lead_s=lead_s)


def replay(rates, config: AutoscalerConfig, lead_s: float | None = 30.0, start: int = 60) -> list[int]:
    """Desired replicas each second from ``start`` on, the pool following every
    decision at once (so both runs face the same pools' rules)."""
    window = MetricsWindow(60, source_ttl_s=5)
    state, current, out = PolicyState(), 1, []
    for i, r in enumerate(rates):
        window.add("m", float(i), concurrency=r * W, arrivals=int(round(r)), source="r")
        if i >= start:
            d, state = decide(context(window, float(i), config, current, lead_s), config, state)
            current = d.desired_serverless
            out.append(current)
    return out


def flat_then(ramp_per_s: float, seconds: int = 120, base: float = 20.0) -> list[float]:
    return [base] * 60 + [max(0.0, base + ramp_per_s * t) for t in range(seconds)]


# ------------------------------------------------------------------ the fit


def test_fit_of_a_straight_line_is_its_slope_with_no_error() -> None:
    t = fit([10 + 2 * i for i in range(30)], bucket_s=1.0)
    assert t.slope == pytest.approx(2.0) and t.stderr == pytest.approx(0.0, abs=1e-9) and t.points == 30
    assert fit([10 + 2 * i for i in range(30)], bucket_s=2.0).slope == pytest.approx(0.5)   # (2/2 s) per 2 s


def test_too_few_points_is_no_trend() -> None:
    assert fit([1, 2, 3], bucket_s=1.0) is None


def test_forecast_is_load_plus_slope_times_horizon_times_time_in_system() -> None:
    trend = Trend(slope=0.5, stderr=0.05, points=60)
    assert forecast(trend, load=100.0, time_in_system_s=4.0, horizon_s=150.0, min_z=3, cap=10) == \
        pytest.approx(100.0 + 0.5 * 150.0 * 4.0)


def test_forecast_is_capped_at_the_scale_up_rate_times_the_load() -> None:
    trend = Trend(slope=50.0, stderr=0.0, points=60)
    assert forecast(trend, load=10.0, time_in_system_s=4.0, horizon_s=150.0, min_z=3, cap=10) == 100.0


def test_an_insignificant_or_falling_slope_forecasts_nothing() -> None:
    kw = {"load": 100.0, "time_in_system_s": 4.0, "horizon_s": 150.0, "min_z": 3, "cap": 10}
    assert forecast(Trend(slope=0.1, stderr=0.05, points=60), **kw) is None      # 2 standard errors
    assert forecast(Trend(slope=-0.5, stderr=0.0, points=60), **kw) is None
    assert forecast(None, **kw) is None


# ------------------------------------------------------------------ from the window


def test_arrival_counts_are_whole_buckets_only() -> None:
    window = MetricsWindow(60, source_ttl_s=5)
    window.add("m", 0.5, concurrency=1.0, arrivals=7, source="a")        # first bucket: starts before the data
    for t in (1.2, 2.2, 4.2):
        window.add("m", t, concurrency=1.0, arrivals=3, source="a")
    window.add("m", 2.7, concurrency=1.0, arrivals=2, source="b")        # sources add up
    window.add("m", 5.1, concurrency=1.0, arrivals=9, source="a")        # the bucket now is in: still filling
    assert window.arrival_counts("m", 5.5, 60) == [3, 5, 0, 3]          # buckets 1..4; 3 had no report


def test_a_ramp_forecasts_ahead_of_the_load() -> None:
    window = window_of(flat_then(0.5, seconds=60))
    now = 119.0
    ctx = context(window, now, ON, current=10, lead_s=30.0)
    assert ctx.trend_concurrency is not None
    assert ctx.trend_concurrency > ctx.panic_concurrency + 0.2 * 30 * W     # at least a good part of the rise
    assert ctx.trend_concurrency <= ctx.panic_concurrency + 0.5 * 30 * W + 1e-6   # never beyond the true slope
    assert context(window, now, ON, current=10, lead_s=60.0).trend_concurrency > ctx.trend_concurrency


def test_no_forecast_when_off_flat_falling_or_without_a_cold_start() -> None:
    rising = window_of(flat_then(0.5, seconds=60))
    assert context(rising, 119.0, OFF, current=10).trend_concurrency is None
    assert context(rising, 119.0, ON, current=10, lead_s=None).trend_concurrency is None
    assert context(window_of([20.0] * 120), 119.0, ON, current=10).trend_concurrency is None
    assert context(window_of(flat_then(-0.2, seconds=60, base=30.0)), 119.0, ON, current=10).trend_concurrency \
        is None


def test_a_burst_that_has_passed_forecasts_nothing() -> None:
    # 20/s, 20 s at 100/s, 20/s again: the window's slope is still positive,
    # but the load is not rising now.
    rates = [20.0] * 80 + [100.0] * 20 + [20.0] * 15
    assert context(window_of(rates), float(len(rates) - 1), ON, current=10).trend_concurrency is None


def test_the_lead_factor_scales_the_horizon() -> None:
    window = window_of(flat_then(0.5, seconds=60))
    one = context(window, 119.0, ON, current=10, lead_s=30.0)
    two = context(window, 119.0, AutoscalerConfig(trend_ahead=True, trend_lead_factor=2.0), current=10,
                  lead_s=30.0)
    assert two.trend_concurrency - two.panic_concurrency == \
        pytest.approx(2 * (one.trend_concurrency - one.panic_concurrency))


def test_window_forecast_needs_load() -> None:
    assert window_forecast(MetricsWindow(60), "m", 10.0, ON, 30.0, None) is None


# ------------------------------------------------------------------ the policy


def test_a_rising_ramp_scales_up_earlier_than_without() -> None:
    rates = flat_then(0.5, seconds=120)
    with_trend, without = replay(rates, ON), replay(rates, OFF)
    assert all(a >= b for a, b in zip(with_trend, without))
    assert sum(with_trend) > sum(without)
    # What the ramp's end needs (80/s x 4 s / 8 = 40), reached this much sooner:
    first = lambda xs: next((i for i, x in enumerate(xs) if x >= 30), len(xs))   # noqa: E731
    assert first(with_trend) + 15 <= first(without)


def test_the_reason_says_the_trend_raised_the_load() -> None:
    window = window_of(flat_then(0.5, seconds=60))
    d, _ = decide(context(window, 119.0, ON, current=10), ON)
    assert "(trend: " in d.reason and "in 30s)" in d.reason


def test_flat_and_falling_loads_decide_as_without() -> None:
    for rates in ([20.0] * 180, flat_then(-0.15, seconds=120, base=30.0)):
        assert replay(rates, ON) == replay(rates, OFF)


def test_poisson_noise_on_a_flat_load_does_not_trigger() -> None:
    rng = np.random.default_rng(7)
    rates = rng.poisson(25.0, 400).astype(float).tolist()
    window = MetricsWindow(60, source_ttl_s=5)
    fired = 0
    for i, r in enumerate(rates):
        window.add("m", float(i), concurrency=float(rng.poisson(100.0)), arrivals=int(r), source="r")
        if i >= 60:
            fired += context(window, float(i), ON, current=13, lead_s=150.0).trend_concurrency is not None
    assert fired == 0
    assert replay(rates, ON, lead_s=150.0) == replay(rates, OFF, lead_s=150.0)


def test_bounds_hold_on_a_forecast() -> None:
    # Projected far enough, a steep rise stops at 10x the load, and the
    # decision still at the ready-based rate limit and max_replicas.
    rates = [5.0] * 60 + [5.0 + 5.0 * t for t in range(12)]
    window = window_of(rates)
    now = float(len(rates) - 1)
    ctx = context(window, now, ON, current=2, lead_s=3000.0)
    assert ctx.trend_concurrency == pytest.approx(10 * ctx.panic_concurrency)
    d, _ = decide(ctx, ON)
    assert d.desired_serverless == 20                       # rate limit: 10 x 2 ready
    small = SPEC.model_copy(update={"max_replicas": 6})
    ctx = ScalingContext.from_window(window, "m", small, ON, now, current_serverless=2, current_dedicated=0,
                                     ready_serverless=2, lead_s=3000.0)
    assert decide(ctx, ON)[0].desired_serverless == 6


def test_a_forecast_below_the_load_changes_nothing() -> None:
    base = ScalingContext(model="m", spec=SPEC, current_serverless=5, current_dedicated=0,
                          stable_concurrency=40.0, panic_concurrency=40.0, metrics_age_s=1.0, held=0,
                          idle_s=0.0, scheduled_min=0, now=100.0)
    from dataclasses import replace

    low = replace(base, trend_concurrency=10.0, lead_s=30.0)
    assert decide(low, ON)[0] == decide(base, ON)[0]
    high = replace(base, trend_concurrency=80.0, lead_s=30.0)
    assert decide(high, ON)[0].desired_serverless == 10


# ------------------------------------------------------------------ the lead and the controller


def test_expected_cold_start_is_the_median_measurement_or_the_last_known() -> None:
    assert expected_cold_start([150.0, None, 160.0, 0.0, 140.0]) == 150.0
    assert expected_cold_start([None, 0.0], previous=120.0) == 120.0
    assert expected_cold_start([]) is None


def test_config_rejects_a_bad_lead_factor_or_z() -> None:
    with pytest.raises(ValueError, match="trend_lead_factor"):
        AutoscalerConfig(trend_lead_factor=0)
    with pytest.raises(ValueError, match="trend_min_z"):
        AutoscalerConfig(trend_min_z=-1)
    assert AutoscalerConfig().trend_ahead is False


def test_controller_passes_its_replicas_cold_start_and_remembers_it() -> None:
    config = MeshConfig.model_validate({"store": "/nonexistent", "autoscaler": {"trend_ahead": True}, "models": {
        "m": {"source": "store://x/1", "engine": "identity",
              "deployment": {"mode": "serverless", "max_replicas": 50, "target_concurrency": 4}}}})
    clock = [0.0]
    provider = FakeProvider()
    ctl = Controller(config, provider, clock=lambda: clock[0], wall=lambda: 1.7e9)

    async def go() -> list[int]:
        await provider.scale("m", "serverless", 1, [])
        provider.handles[0].cold_start_s = 30.0
        assert ctl._context("m", 0.0, 0).lead_s == 30.0
        counts = []
        for t in range(90):                  # 10/s for a minute, then +1/s each second
            clock[0] = float(t)
            rate = 10 if t < 60 else 10 + (t - 60)
            ctl.on_report(mesh_pb2.LoadReport(source="r", models=[
                mesh_pb2.ModelLoad(model="m", in_flight=rate * 2, arrivals=rate)]))
            await ctl.tick()
            counts.append(provider.count("m"))
        return counts

    counts = asyncio.run(go())
    # At t = 89: 39/s x 2 s = 78 in flight wants 20 replicas; the trend asks for more.
    assert counts[-1] > 20
    provider.handles.clear()
    assert ctl._context("m", 90.0, 0).lead_s == 30.0       # remembered with no replica left


def test_a_cleared_backlog_does_not_inflate_the_projection() -> None:
    # The stable window still holds a backlog (40 s in the system), the panic
    # window does not (4 s): the rise is projected with the smaller W.
    rates = flat_then(0.5, seconds=60)
    window = MetricsWindow(60, source_ttl_s=5)
    for i, r in enumerate(rates):
        window.add("m", float(i), concurrency=r * (40.0 if 60 <= i < 100 else W), arrivals=int(round(r)),
                   source="r")
    ctx = context(window, 119.0, ON, current=10, lead_s=30.0)
    assert ctx.trend_concurrency is not None
    assert ctx.trend_concurrency - ctx.panic_concurrency <= 0.5 * 30 * W + 1e-6


def test_a_simulated_replica_already_serving_reports_the_profiles_cold_start() -> None:
    from sim.events import EventLoop
    from sim.profiles import parse_profiles
    from sim.replicas import SimProvider

    profiles = parse_profiles({"name": "p", "models": {"llm": {"latency_ms": {1: 100}, "cold_start_s": 150}}})
    noop = lambda *a: None   # noqa: E731
    provider = SimProvider(EventLoop(), profiles, np.random.default_rng(0), on_ready=noop, on_drain=noop,
                           on_done=noop)
    provider.prestart("llm", 2)
    assert [h.cold_start_s for h in provider.replicas()] == [150.0, 150.0]
    assert provider.cold_starts["llm"] == [0.0, 0.0]       # it started no cold start in the run
