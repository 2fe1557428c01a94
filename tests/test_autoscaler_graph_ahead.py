"""Graph-ahead scaling: upstream arrivals x measured branch ratios -> downstream load."""
import asyncio

import pytest

from autoscaler.controller import Controller
from autoscaler.graph_ahead import Rates, ahead_concurrency, model_edges, window_rates
from autoscaler.policy import ScalingContext, decide
from autoscaler.window import MetricsWindow
from cmesh.config import AutoscalerConfig, DeploymentConfig, MeshConfig
from protos import mesh_pb2
from tests.test_autoscaler_controller import FakeProvider


def mesh(graph_ahead: bool = True) -> MeshConfig:
    model = {"source": "store://x/1", "engine": "identity",
             "deployment": {"mode": "serverless", "max_replicas": 50, "target_concurrency": 4}}
    return MeshConfig.model_validate({
        "store": "/nonexistent",
        "autoscaler": {"graph_ahead": graph_ahead, "stable_window_s": 30, "panic_window_s": 3},
        "models": {m: model for m in ("embed", "intent", "index", "sql", "llm")},
        "pipelines": {"agent": {"nodes": {
            "intent": {"model": "intent", "input": "request.text"},
            "embed": {"model": "embed", "input": "request.text"},
            "retrieve": {"model": "index", "input": "embed.output"},
            "orders": {"model": "sql", "when": "intent.label == 'order'", "optional": True},
            "answer": {"model": "llm", "after": ["retrieve", "orders"]}}}}})


def test_edges_point_from_entry_models_to_downstream_models() -> None:
    assert model_edges(mesh()) == {"index": ("embed",), "llm": ("embed", "intent"), "sql": ("intent",)}


def test_prediction_is_upstream_rate_times_ratio_times_time_in_system() -> None:
    edges = {"llm": ("embed",)}
    # Long window: 10/s into embed, 5/s reach the LLM (ratio 0.5), 20 in flight there (W = 4 s).
    rates = Rates(short={"embed": 100.0}, long={"embed": 10.0, "llm": 5.0}, concurrency={"llm": 20.0})
    assert ahead_concurrency(edges, rates) == {"llm": pytest.approx(100.0 * 0.5 * 4.0)}


def test_no_prediction_for_a_model_never_seen() -> None:
    rates = Rates(short={"embed": 100.0}, long={"embed": 10.0}, concurrency={})
    assert ahead_concurrency({"llm": ("embed",)}, rates) == {}


def test_window_rates_cover_only_the_data_kept() -> None:
    w = MetricsWindow(30, source_ttl_s=5)
    for t in range(10):
        w.add("embed", float(t), concurrency=1.0, arrivals=10, source="r")
    r = window_rates(w, ["embed"], 9.0, 3.0, 30.0)
    assert r.long["embed"] == pytest.approx(100 / 9.0)     # 10 s of data, not 30
    assert r.short["embed"] == pytest.approx(40 / 3.0)     # buckets 6..9 overlap (6, 9]


def test_policy_scales_to_the_predicted_load() -> None:
    spec = DeploymentConfig(mode="serverless", max_replicas=50, target_concurrency=4)
    ctx = ScalingContext(model="llm", spec=spec, current_serverless=2, current_dedicated=0,
                         stable_concurrency=8.0, panic_concurrency=8.0, metrics_age_s=1.0, held=0,
                         idle_s=0.0, scheduled_min=0, now=100.0)
    assert decide(ctx, AutoscalerConfig())[0].desired_serverless == 2
    from dataclasses import replace

    ahead = decide(replace(ctx, ahead_concurrency=40.0), AutoscalerConfig())[0]
    assert ahead.desired_serverless == 10 and ahead.panic


def _drive(graph_ahead: bool) -> int:
    async def go() -> int:
        clock = [0.0]
        provider = FakeProvider()
        ctl = Controller(mesh(graph_ahead), provider, clock=lambda: clock[0], wall=lambda: 1.7e9)

        def report(embed_rate: int, llm_conc: int) -> mesh_pb2.LoadReport:
            return mesh_pb2.LoadReport(source="r", models=[
                mesh_pb2.ModelLoad(model="embed", in_flight=1, arrivals=embed_rate),
                mesh_pb2.ModelLoad(model="intent", in_flight=1, arrivals=embed_rate),
                mesh_pb2.ModelLoad(model="llm", in_flight=llm_conc, arrivals=embed_rate // 2)])

        for _ in range(30):                       # steady: 10/s, half reach the LLM, 8 in flight
            ctl.on_report(report(10, 8))
            await ctl.tick()
            clock[0] += 1.0
        ctl.on_report(report(100, 8))             # the surge hits the entry models first
        await ctl.tick()
        return provider.count("llm")

    return asyncio.run(go())


def test_controller_scales_downstream_ahead_only_with_the_flag() -> None:
    assert _drive(False) == 2                     # 8 in flight / 4: the LLM's own load
    assert _drive(True) > 2


def test_no_prediction_unless_the_upstream_arrivals_rise() -> None:
    edges = {"llm": ("embed",)}
    long = {"embed": 10.0, "llm": 5.0}
    # The surge is over (short below long) or steady: the LLM's own load decides,
    # even when a backlog makes its time in system (W) long.
    for short in (4.0, 10.0):
        rates = Rates(short={"embed": short}, long=long, concurrency={"llm": 200.0})
        assert ahead_concurrency(edges, rates) == {}
    rising = Rates(short={"embed": 30.0}, long=long, concurrency={"llm": 20.0})
    assert ahead_concurrency(edges, rising) == {"llm": pytest.approx(30.0 * 0.5 * 4.0)}
