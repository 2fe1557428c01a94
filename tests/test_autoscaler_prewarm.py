"""Coordinated pre-warming plans on the demo config and on small graphs."""
import pytest

from autoscaler.prewarm import models_of_pipeline, node_dependencies, pipelines_of_model, warm_plan
from cmesh.config import MeshConfig, load_config, parse_config
from cmesh.errors import NotFound
from meshtest import REPO

SUPPORT = {"intent-classifier", "embedder", "kb-index", "sql-executor", "dialogue-llm"}


@pytest.fixture(scope="module")
def mesh():
    return load_config(REPO / "compose" / "mesh.yaml")


@pytest.mark.parametrize("touched", sorted(SUPPORT))
def test_touching_any_model_plans_every_other(mesh, touched) -> None:
    plan = warm_plan(mesh, touched)
    assert plan.trigger == touched and plan.pipelines == ("support-agent",)
    assert set(plan.models) == SUPPORT - {touched}
    assert len(plan.models) == len(SUPPORT) - 1


def test_levels_follow_after_and_input_references(mesh) -> None:
    plan = warm_plan(mesh, "embedder")
    levels = {i.model: i.level for i in plan.items}
    assert levels == {"intent-classifier": 0, "kb-index": 1, "sql-executor": 1, "dialogue-llm": 2}
    # Without estimates the shallowest (needed soonest) come first.
    assert plan.models == ["intent-classifier", "kb-index", "sql-executor", "dialogue-llm"]


def test_long_cold_start_starts_first(mesh) -> None:
    plan = warm_plan(mesh, "embedder", cold_start_s={"dialogue-llm": 30.0, "kb-index": 1.0,
                                                     "intent-classifier": 2.0, "sql-executor": 0.5})
    assert plan.models[0] == "dialogue-llm"
    assert plan.items[0].start_by_s < 0


def test_compute_estimates_set_the_needed_time(mesh) -> None:
    plan = warm_plan(mesh, "intent-classifier",
                     compute_s={"embedder": 0.01, "kb-index": 0.005, "intent-classifier": 0.002,
                                "sql-executor": 0.003})
    needed = {i.model: i.needed_at_s for i in plan.items}
    assert needed["embedder"] == 0.0
    assert needed["kb-index"] == pytest.approx(0.01)
    assert needed["sql-executor"] == pytest.approx(0.002)
    assert needed["dialogue-llm"] == pytest.approx(0.015)     # the retrieve path is the critical one
    assert plan.models == ["embedder", "sql-executor", "kb-index", "dialogue-llm"]


def test_single_model_pipeline_and_unknown_names(mesh) -> None:
    assert warm_plan(mesh, "code-llm").items == ()
    assert pipelines_of_model(mesh, "code-llm") == ["code-review"]
    with pytest.raises(NotFound):
        warm_plan(mesh, "nope")
    with pytest.raises(NotFound):
        warm_plan(mesh, "embedder", pipeline="nope")


def test_whole_pipeline_without_trigger(mesh) -> None:
    plan = warm_plan(mesh, None, pipeline="support-agent")
    assert set(plan.models) == SUPPORT
    assert plan.models[-1] == "dialogue-llm"


def test_models_of_pipeline_in_dependency_order(mesh) -> None:
    models = models_of_pipeline(mesh, "support-agent")
    assert set(models) == SUPPORT and len(models) == 5
    assert models.index("embedder") < models.index("kb-index") < models.index("dialogue-llm")
    assert models.index("intent-classifier") < models.index("sql-executor")


def graph(nodes: dict) -> MeshConfig:
    models = {m: {"source": "s"} for m in ("a", "b", "c", "d")}
    return parse_config({"models": models, "pipelines": {"p": {"nodes": nodes}}})


def test_implicit_dependencies_from_input_and_when() -> None:
    cfg = graph({
        "first": {"model": "a", "input": "request.text"},
        "second": {"model": "b", "input": {"q": "first.output", "t": "request.text"}},
        "third": {"model": "c", "when": "second.label == 'first.x'"},
        "fourth": {"model": "d", "input": "third.passages"},
    })
    deps = node_dependencies(cfg.pipelines["p"])
    assert deps == {"first": frozenset(), "second": {"first"}, "third": {"second"}, "fourth": {"third"}}
    levels = {i.model: i.level for i in warm_plan(cfg, "a").items}
    assert levels == {"b": 1, "c": 2, "d": 3}


def test_references_read_as_node_then_output_as_the_expression_language_does() -> None:
    cfg = graph({
        "x": {"model": "a"},
        "z": {"model": "c", "input": "x.y.output"},      # node x, its output y
    })
    assert node_dependencies(cfg.pipelines["p"])["z"] == {"x"}


def test_implicit_cycle_is_refused_at_load() -> None:
    # A cycle through expressions never reaches the planner: config loading refuses it.
    from cmesh.validation import ConfigError

    with pytest.raises(ConfigError, match="cycle"):
        graph({"p1": {"model": "a", "input": "p2.output"}, "p2": {"model": "b", "after": ["p1"]}})


def test_a_model_in_two_pipelines_takes_its_earliest_need() -> None:
    models = {m: {"source": "s"} for m in ("a", "b", "c")}
    cfg = parse_config({"models": models, "pipelines": {
        "deep": {"nodes": {"n1": {"model": "a"}, "n2": {"model": "b", "after": ["n1"]},
                           "n3": {"model": "c", "after": ["n2"]}}},
        "flat": {"nodes": {"m1": {"model": "a"}, "m2": {"model": "c"}}},
    }})
    plan = warm_plan(cfg, "a")
    assert set(plan.pipelines) == {"deep", "flat"}
    item = {i.model: i for i in plan.items}["c"]
    assert (item.level, item.pipeline) == (0, "flat")
    assert warm_plan(cfg, "a", pipeline="deep").items[-1].level == 2


def test_order_pairs_model_and_level(mesh) -> None:
    plan = warm_plan(mesh, "embedder")
    assert plan.order == [("intent-classifier", 0), ("kb-index", 1), ("sql-executor", 1), ("dialogue-llm", 2)]


def test_serial_cold_start_sums_the_longest_dependency_path(mesh) -> None:
    from autoscaler.prewarm import serial_cold_start_s

    starts = {"embedder": 0.5, "intent-classifier": 0.7, "kb-index": 0.1, "dialogue-llm": 0.3}
    # intent and embed start together; retrieve waits for embed, the answer for both.
    chain = serial_cold_start_s(mesh, "support-agent", starts)
    longest = max(starts["embedder"] + starts["kb-index"], starts["intent-classifier"]) + starts["dialogue-llm"]
    assert chain == pytest.approx(longest)
    assert serial_cold_start_s(mesh, "support-agent", {}) == 0.0
    with pytest.raises(NotFound):
        serial_cold_start_s(mesh, "nope", starts)
