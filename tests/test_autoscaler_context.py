"""One context builder for the controller, the tests and the simulator, and the
warm-up floor as part of the policy."""
import asyncio
from dataclasses import replace

import pytest

from autoscaler.controller import Controller
from autoscaler.policy import ScalingContext, decide
from autoscaler.window import MetricsWindow
from cmesh.config import AutoscalerConfig, DeploymentConfig, MeshConfig
from tests.test_autoscaler_controller import FakeProvider

CFG = AutoscalerConfig()


def serverless(**kw) -> DeploymentConfig:
    return DeploymentConfig(**{"mode": "serverless", "max_replicas": 20, "target_concurrency": 8,
                               "idle_timeout_s": 300, **kw})


def test_a_zero_timestamp_is_a_time_not_unknown() -> None:
    # A virtual clock starts at 0.0: traffic and warm-ups stamped then still count.
    window = MetricsWindow(60, source_ttl_s=5)
    window.add("m", 0.0, 3.0, source="r")
    c = ScalingContext.from_window(window, "m", serverless(), CFG, 4.0, current_serverless=1,
                                   current_dedicated=0)
    assert c.idle_s == pytest.approx(4.0)
    warmed = ScalingContext.from_window(MetricsWindow(60), "x", serverless(), CFG, 4.0, current_serverless=0,
                                        current_dedicated=0, touched_at=0.0)
    assert warmed.idle_s == pytest.approx(4.0) and warmed.warmed_s == pytest.approx(4.0)


def test_idle_is_never_negative() -> None:
    c = ScalingContext.from_window(MetricsWindow(60), "m", serverless(), CFG, 10.0, current_serverless=0,
                                   current_dedicated=0, touched_at=10.0000001)
    assert c.idle_s == 0.0 and c.warmed_s == 0.0


def test_the_controller_context_is_from_window() -> None:
    config = MeshConfig.model_validate({"store": "/nonexistent", "models": {
        "m": {"source": "store://x/1", "engine": "identity", "deployment": {"mode": "serverless"}}}})
    ctl = Controller(config, FakeProvider(), clock=lambda: 0.0, wall=lambda: 1.7e9)
    ctl.window.add("m", 0.0, 2.0, source="r")
    ctl._warmed_at["m"] = 0.0
    expected = ScalingContext.from_window(ctl.window, "m", config.models["m"].deployment, config.autoscaler,
                                          3.0, current_serverless=0, current_dedicated=0, scheduled_min=2,
                                          touched_at=0.0, ready_serverless=0)
    assert ctl._context("m", 3.0, 2) == expected
    assert expected.idle_s == pytest.approx(3.0) and expected.warmed_s == pytest.approx(3.0)


def test_warm_up_floor_without_metrics_starts_one() -> None:
    c = ScalingContext.from_window(MetricsWindow(60), "m", serverless(), CFG, 5.0, current_serverless=0,
                                   current_dedicated=0, touched_at=4.0)
    d, _ = decide(c, CFG)
    assert d.valid and d.desired_serverless == 1 and "warmed" in d.reason
    late = replace(c, warmed_s=300.0)                      # the idle timeout has passed
    assert not decide(late, CFG)[0].valid
    running = replace(c, current_serverless=2)             # already up: no decision, keep what runs
    assert not decide(running, CFG)[0].valid


def test_warm_up_floor_with_zero_load_keeps_one() -> None:
    window = MetricsWindow(60, source_ttl_s=5)
    window.add("m", 9.0, 0.0, source="r")
    c = ScalingContext.from_window(window, "m", serverless(), CFG, 10.0, current_serverless=0,
                                   current_dedicated=0, touched_at=8.0)
    assert decide(c, CFG)[0].desired_serverless == 1
    assert decide(replace(c, warmed_s=None), CFG)[0].desired_serverless == 0


def test_controller_warm_starts_a_replica_through_the_policy() -> None:
    config = MeshConfig.model_validate({"store": "/nonexistent", "autoscaler": {"coordinated_prewarm": False},
                                        "models": {"m": {"source": "store://x/1", "engine": "identity"}}})
    provider = FakeProvider()
    ctl = Controller(config, provider, clock=lambda: 0.0, wall=lambda: 1.7e9)
    asyncio.run(ctl.warm(model="m"))
    assert provider.count("m") == 1
    assert "warmed" in ctl._decisions["m"].reason
