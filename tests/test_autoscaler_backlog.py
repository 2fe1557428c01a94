"""Backlog-aware scale-up: a pool sized for its arrival rate plus its queue's work, not its queue's length."""
import asyncio

import pytest

from autoscaler.backlog import drain_load, observe_service, panic_rate
from autoscaler.controller import Controller
from autoscaler.policy import PolicyState, ScalingContext, decide
from autoscaler.window import MetricsWindow
from cmesh.config import AutoscalerConfig, DeploymentConfig, MeshConfig
from protos import mesh_pb2
from tests.test_autoscaler_controller import FakeProvider

ON = AutoscalerConfig(backlog_drain_s=150.0)   # stable 60 s, panic 6 s; a queue drained over 150 s
OFF = AutoscalerConfig()
SPEC = DeploymentConfig(mode="serverless", max_replicas=1000, target_concurrency=8, idle_timeout_s=300)
S = 4.0                                        # seconds in the system while the pool keeps up


# ------------------------------------------------------------------ the pure parts


def test_drain_load_is_the_flow_plus_the_queue_spread_over_the_horizon() -> None:
    # 10/s x 4 s = 40 is the flow; 400 more are queue: 400 x 4 / 100 s = 16 to drain it.
    assert drain_load(440.0, rate=10.0, service_s=S, horizon_s=100.0) == pytest.approx(56.0)
    # No queue beyond the flow: the load as it is.
    assert drain_load(30.0, rate=10.0, service_s=S, horizon_s=100.0) == 30.0
    # A horizon shorter than a call's own time cannot drain faster than the load.
    assert drain_load(440.0, rate=10.0, service_s=S, horizon_s=1.0) == 440.0


def test_drain_load_without_a_rate_service_time_or_horizon_is_the_load() -> None:
    for kw in ({"rate": None, "service_s": S, "horizon_s": 100.0}, {"rate": 10.0, "service_s": None,
               "horizon_s": 100.0}, {"rate": 10.0, "service_s": S, "horizon_s": None},
               {"rate": 10.0, "service_s": 0.0, "horizon_s": 100.0}):
        assert drain_load(440.0, **kw) == 440.0


def test_service_time_is_remembered_only_while_the_pool_keeps_up() -> None:
    assert observe_service(None, load=40.0, rate=10.0, keeping_up=True) == pytest.approx(4.0)
    # Folded in with weight 0.1: 4 + 0.1 x (8 - 4).
    assert observe_service(4.0, load=80.0, rate=10.0, keeping_up=True) == pytest.approx(4.4)
    # Short (replicas starting, or held requests), or no traffic: unchanged.
    assert observe_service(4.0, load=400.0, rate=10.0, keeping_up=False) == 4.0
    assert observe_service(4.0, load=0.0, rate=0.0, keeping_up=True) == 4.0
    assert observe_service(None, load=40.0, rate=None, keeping_up=True) is None


def test_panic_rate_is_arrivals_per_second_over_the_panic_window() -> None:
    window = MetricsWindow(60, source_ttl_s=5)
    for i in range(20):
        window.add("m", float(i), concurrency=1.0, arrivals=10, source="r")
    assert panic_rate(window, "m", 19.5, 6.0) == pytest.approx(10.0)      # whole buckets 14..18
    assert panic_rate(window, "other", 19.0, 6.0) is None


# ------------------------------------------------------------------ the decision


def backlogged(queue: float, rate: float = 10.0, seconds: int = 70) -> MetricsWindow:
    """``rate`` arrivals a second with the flow's ``rate x S`` in the system,
    and ``queue`` more in the last ten seconds (the pool fell short)."""
    window = MetricsWindow(60, source_ttl_s=5)
    for i in range(seconds):
        extra = queue if i >= seconds - 10 else 0.0
        window.add("m", float(i), concurrency=rate * S + extra, arrivals=int(rate), source="r")
    return window


def context(window: MetricsWindow, now: float, config: AutoscalerConfig, current: int, ready: int,
            service_s: float | None = S, lead_s: float | None = 150.0) -> ScalingContext:
    return ScalingContext.from_window(window, "m", SPEC, config, now, current_serverless=current,
                                      current_dedicated=0, ready_serverless=ready, lead_s=lead_s,
                                      service_s=service_s)


def test_a_queue_while_replicas_start_asks_for_its_work_not_its_length() -> None:
    # 5 ready and 5 starting for 10/s x 4 s = 40 (5 at 8 each); 1,600 queued behind them.
    window = backlogged(1600.0)
    off, _ = decide(context(window, 69.0, OFF, current=10, ready=5), OFF, PolicyState())
    on, _ = decide(context(window, 69.0, ON, current=10, ready=5), ON, PolicyState())
    # Without: 1,640 in the system / 8 = 205 replicas (the scale-up limit allows 50).
    assert off.desired_serverless == 50
    # With: 40 + 1,600 x 4 / 150 = 82.7 -> 11 replicas, and the reason says why.
    assert on.desired_serverless == 11
    assert "backlog: 1640.0 in the system is mostly queue; its work over 150s needs 11 → 11" in on.reason


def test_the_cap_never_shrinks_the_pool_and_leaves_scale_down_alone() -> None:
    # A queue, but the pool is already larger than its work needs: kept, not cut.
    window = backlogged(1600.0)
    on, _ = decide(context(window, 69.0, ON, current=30, ready=20), ON, PolicyState())
    assert on.desired_serverless == 30
    # The load gone (no queue, 1/s): scale-down as without.
    quiet = backlogged(0.0, rate=1.0)
    on, _ = decide(context(quiet, 69.0, ON, current=5, ready=5), ON, PolicyState())
    off, _ = decide(context(quiet, 69.0, OFF, current=5, ready=5), OFF, PolicyState())
    assert on.desired_serverless == off.desired_serverless < 5


def test_without_a_measured_service_time_it_scales_as_before() -> None:
    window = backlogged(1600.0)
    off, _ = decide(context(window, 69.0, OFF, current=10, ready=5), OFF, PolicyState())
    on, _ = decide(context(window, 69.0, ON, current=10, ready=5, service_s=None), ON, PolicyState())
    assert on.desired_serverless == off.desired_serverless


def test_a_shorter_drain_time_provisions_more_for_the_same_queue() -> None:
    window = backlogged(1600.0)
    wants = [decide(context(window, 69.0, AutoscalerConfig(backlog_drain_s=d), current=10, ready=5),
                    AutoscalerConfig(backlog_drain_s=d), PolicyState())[0].desired_serverless for d in (150, 30, 10)]
    # 40 + 1,600 x 4 / D over 8 per replica: 11, 32, then the scale-up limit (50).
    assert wants == [11, 32, 50]


def test_a_rising_flow_still_scales_up_in_full() -> None:
    # No queue: 50/s x 4 s = 200 in the system is all flow -> 25 replicas, on or off.
    window = MetricsWindow(60, source_ttl_s=5)
    for i in range(70):
        rate = 10 if i < 60 else 50
        window.add("m", float(i), concurrency=rate * S, arrivals=rate, source="r")
    off, _ = decide(context(window, 69.0, OFF, current=5, ready=5), OFF, PolicyState())
    on, _ = decide(context(window, 69.0, ON, current=5, ready=5), ON, PolicyState())
    assert on.desired_serverless == off.desired_serverless == 25


def test_the_trend_projects_from_the_flow_not_the_queue() -> None:
    both = AutoscalerConfig(backlog_drain_s=150.0, trend_ahead=True)
    window = MetricsWindow(60, source_ttl_s=5)
    for i in range(70):                       # a ramp, +0.5/s a second, and a queue of 1,000 at the end
        rate = 10.0 + 0.5 * i
        window.add("m", float(i), concurrency=rate * S + (1000.0 if i >= 60 else 0.0), arrivals=int(rate),
                   source="r")
    ctx = context(window, 69.0, both, current=20, ready=10)
    assert ctx.trend_concurrency is not None
    drained = drain_load(ctx.panic_concurrency, rate=ctx.arrival_rate, service_s=S, horizon_s=150.0)
    # Projected from the drained load with S (slope about 0.5/s, the counts being
    # whole numbers), not from 1,000 more with an inflated time in system.
    assert drained + 0.49 * 150.0 * S <= ctx.trend_concurrency <= drained + 0.51 * 150.0 * S
    assert ctx.trend_concurrency < ctx.panic_concurrency


# ------------------------------------------------------------------ the controller


def test_controller_measures_the_service_time_while_keeping_up_and_caps_the_queue_after() -> None:
    config = MeshConfig.model_validate({"store": "/nonexistent", "autoscaler": {"backlog_drain_s": 150}, "models": {
        "m": {"source": "store://x/1", "engine": "identity",
              "deployment": {"mode": "serverless", "max_replicas": 500, "target_concurrency": 8}}}})
    clock = [0.0]
    provider = FakeProvider()
    ctl = Controller(config, provider, clock=lambda: clock[0], wall=lambda: 1.7e9)

    async def go() -> None:
        await provider.scale("m", "serverless", 5, [])
        for h in provider.handles:
            h.cold_start_s = 150.0
        for t in range(70):                   # 10/s, 40 in the system: 4 s each, 5 replicas keep up
            clock[0] = float(t)
            ctl.on_report(mesh_pb2.LoadReport(source="r", models=[
                mesh_pb2.ModelLoad(model="m", in_flight=40, arrivals=10)]))
            await ctl.tick()
        assert ctl._service["m"] == pytest.approx(S, rel=0.05)
        assert provider.count("m") == 5
        provider.handles[-1].state = "warming"        # one starting: the pool is short now
        for t in range(70, 80):                       # the same flow, and 1,600 queued
            clock[0] = float(t)
            ctl.on_report(mesh_pb2.LoadReport(source="r", models=[
                mesh_pb2.ModelLoad(model="m", in_flight=40, queue_depth=1600, arrivals=10)]))
            await ctl.tick()
        # Not measured while short, and the queue asks for its work over 150 s, not 205 replicas.
        assert ctl._service["m"] == pytest.approx(S, rel=0.05)
        assert provider.count("m") <= 12

    asyncio.run(go())


def test_config_default_is_off_and_a_drain_time_must_be_positive() -> None:
    assert AutoscalerConfig().backlog_drain_s is None
    with pytest.raises(ValueError, match="backlog_drain_s"):
        MeshConfig.model_validate({"store": "/x", "autoscaler": {"backlog_drain_s": 0}, "models": {}})
