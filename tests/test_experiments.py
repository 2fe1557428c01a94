"""The experiments harness: strategy configs and result tables (pure), and one
strategy run end to end on real autoscaler, router and model-server processes."""
import json
import os
from pathlib import Path

import pytest
import yaml

from cmesh.config import parse_config
from loadtest import experiments
from loadtest.experiment_plan import (STRATEGIES, Outcome, base_config, headline, markdown, peak_counts,
                                      strategy_config)
from meshtest import free_port, identity_text_model

REPO = Path(__file__).resolve().parent.parent
DEMO = yaml.safe_load((REPO / "compose" / "mesh.yaml").read_text())


def demo_base(compress: float = 3.0) -> dict:
    return base_config(DEMO, "/tmp/store", "127.0.0.1:8599", compress)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_config_is_a_valid_mesh_config(strategy) -> None:
    counts = {m: 2 for m in DEMO["models"]}
    config = parse_config(strategy_config(demo_base(), strategy, counts if strategy == "static" else None))
    modes = {m.deployment.mode for m in config.models.values()}
    assert set(config.pipelines) == set(DEMO["pipelines"]) and not config.tenants
    if strategy == "static":
        assert modes == {"dedicated"}
        assert all(m.deployment.dedicated_replicas == 2 for m in config.models.values())
    else:
        assert modes == {"serverless"} and all(m.deployment.min_replicas == 0 for m in config.models.values())
    assert config.autoscaler.strategy == ("uniform" if strategy == "uniform" else "per-model")


def test_strategies_share_one_profile_and_differ_only_in_how_they_scale() -> None:
    base = demo_base()
    per_model, uniform = strategy_config(base, "permodel"), strategy_config(base, "uniform")
    assert per_model["models"] == uniform["models"]
    assert {k: v for k, v in uniform["autoscaler"].items() if k != "strategy"} == per_model["autoscaler"]


def test_windows_shrink_with_the_compression() -> None:
    slow, fast = demo_base(1.0)["autoscaler"], demo_base(3.0)["autoscaler"]
    assert fast["stable_window_s"] == pytest.approx(slow["stable_window_s"] / 3)
    assert fast["scale_down_delay_s"] == pytest.approx(slow["scale_down_delay_s"] / 3)
    assert fast["panic_window_s"] <= fast["stable_window_s"]
    idle = {m: s["deployment"]["idle_timeout_s"] for m, s in demo_base(3.0)["models"].items()}
    assert all(v == pytest.approx(demo_base(1.0)["models"][m]["deployment"]["idle_timeout_s"] / 3)
               for m, v in idle.items())


def test_static_needs_counts_and_sizes_from_the_peak() -> None:
    with pytest.raises(ValueError, match="static_counts"):
        strategy_config(demo_base(), "static")
    with pytest.raises(ValueError, match="strategy"):
        strategy_config(demo_base(), "elastic")
    assert peak_counts({"a": 3, "b": 0}, ["a", "b", "c"]) == {"a": 3, "b": 1, "c": 1}


def summary(p95: float, replica_s: dict[str, float], *, requests: int = 100, ok: int = 100) -> dict:
    return {"totals": {"scenario": "spike10x", "p50_ms": p95 / 3, "p95_ms": p95, "p99_ms": p95 * 2,
                       "throughput_rps": 10.0, "requests": requests, "ok": ok, "errors_by_code": {}},
            "replica_seconds": replica_s, "replicas": {"max_ready": {m: 2 for m in replica_s}},
            "by_latency_class": {"interactive": {"p95_ms": p95}}}


def test_headline_and_table() -> None:
    outcomes = {"permodel": Outcome.of("permodel", summary(66.0, {"a": 30.0, "b": 30.0})),
                "static": Outcome.of("static", summary(60.0, {"a": 50.0, "b": 50.0})),
                "uniform": Outcome.of("uniform", summary(90.0, {"a": 40.0, "b": 45.0}, ok=98))}
    head = headline(outcomes)
    assert head["permodel_cost_ratio"] == 0.6 and head["permodel_p95_over_static"] == 1.1
    assert head["uniform_replica_s"] == 85.0 and head["drops"] == 2
    assert {"static_p95_ms", "permodel_p95_ms", "uniform_p95_ms", "static_replica_s", "permodel_replica_s",
            "uniform_replica_s", "permodel_cost_ratio", "drops"} <= set(head)
    table = markdown({"spike10x": outcomes}, {"independent_s": 4.0, "coordinated_s": 2.0, "ratio": 0.5},
                     {"compress": 3, "rate_scale": 1 / 3, "machine": "test"})
    assert "| spike10x | permodel | 22.0 | 66.0 | 132.0 | 10.00 | 60.0 | 0.60 | 0 |" in table
    assert "| spike10x | uniform |" in table and "Ratio coordinated / independent: 0.50" in table
    partial = headline({"permodel": outcomes["permodel"]})
    assert partial["static_p95_ms"] is None and partial["permodel_cost_ratio"] is None


def test_arguments() -> None:
    quick = experiments.parse_args(["--quick"])
    assert quick.compress == 3.0 and quick.rate_scale == pytest.approx(1 / 3)
    assert [p.stem for p in quick.scenario_paths] == ["spike10x"]
    assert len(experiments.parse_args([]).scenario_paths) == 4
    for bad in (["--scenarios", "nope"], ["--strategies", "static"], ["--compress", "-1"]):
        with pytest.raises(SystemExit):
            experiments.parse_args(bad)


MESH = ("-m\x00autoscaler", "-m\x00router", "-m\x00model_server", "autoscaler.providers.zygote")


def _mesh_process(pid: int) -> bool:
    """A live (not zombie) autoscaler, router, fork server or replica process."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
        with open(f"/proc/{pid}/cmdline") as fh:
            cmdline = fh.read()
    except OSError:
        return False
    return any(part in cmdline for part in MESH)


def test_one_strategy_runs_end_to_end_on_real_processes(tmp_path) -> None:
    """Start autoscaler and router, warm a model from zero, replay a short scenario,
    stop: every request answered, replicas sampled, no process left behind."""
    store = tmp_path / "store"
    source = identity_text_model(store, "fast")
    port = free_port()
    config = {"store": str(store), "models": {"fast": {
        "source": source, "deployment": {"mode": "serverless", "max_replicas": 2, "target_concurrency": 4}}},
        "autoscaler": {"listen": f"127.0.0.1:{port}", "tick_s": 0.5}, "router": {"autoscaler": f"127.0.0.1:{port}"}}
    scenario = tmp_path / "tiny.yaml"
    scenario.write_text(yaml.safe_dump({"name": "tiny", "seed": 1, "duration_s": 4, "classes": [
        {"name": "x", "model": "fast", "rate_per_s": 10, "texts": ["hello"]}]}))
    before = set(os.listdir("/proc"))
    lines: list[str] = []
    result = experiments.run_strategy("permodel", config, scenario, compress=1.0, rate_scale=1.0,
                                      out=tmp_path / "out", log=lines.append)
    totals = result["totals"]
    assert totals["requests"] > 10 and totals["ok"] == totals["requests"] and totals["lost"] == 0
    assert result["replicas"]["max_ready"]["fast"] >= 1 and result["replica_seconds"]["fast"] > 0
    assert (tmp_path / "out" / "tiny" / "permodel" / "summary.json").exists()
    assert any("mesh warm" in line for line in lines)
    json.loads((tmp_path / "out" / "tiny" / "permodel" / "summary.json").read_text())
    # Every mesh process the run started is gone.
    started = {int(p) for p in set(os.listdir("/proc")) - before if p.isdigit()}
    assert not [p for p in started if _mesh_process(p)]
