"""``cmesh profile``: each model measured with what its pipeline sends it, and the branches it takes."""
import random
from pathlib import Path

import numpy as np
import pytest
import yaml

from cmesh.config import parse_config
from cmesh.store import ModelStore
from loadtest.experiment_plan import base_config
from loadtest.scenario import load_scenario
from sim.measure import _branches, measure, measure_order, probes, scenario_texts, when_fields
from sim.pipelines import Outputs
from sim.profiles import parse_profiles

REPO = Path(__file__).resolve().parents[1]
ORDER_TEXT, PLAIN_TEXT, NUMBER_TEXT = "Where is my order 1042?", "Do you ship to Canada?", "I paid 30 twice."


def demo_config(store: Path):
    data = base_config(yaml.safe_load((REPO / "compose" / "mesh.yaml").read_text()), str(store),
                       "127.0.0.1:1", 1.0)
    return data, parse_config(data, "demo mesh")


def manifest(config, model: str):
    source = next(iter(config.models[model].variant_sources().values())).source
    return ModelStore(config.store).open(source).manifest


def test_models_are_measured_upstream_first(demo_store: Path) -> None:
    _, config = demo_config(demo_store)
    order = measure_order(config, ["dialogue-llm", "sql-executor", "kb-index", "embedder", "intent-classifier"])
    assert order.index("embedder") < order.index("kb-index") < order.index("dialogue-llm")
    assert order.index("intent-classifier") < order.index("sql-executor") < order.index("dialogue-llm")


def test_probes_are_the_pipeline_nodes_inputs_on_the_upstream_answers(demo_store: Path) -> None:
    _, config = demo_config(demo_store)
    texts = [ORDER_TEXT, PLAIN_TEXT, NUMBER_TEXT]
    answers = {
        "intent-classifier": {ORDER_TEXT: {"label": "order_status"}, PLAIN_TEXT: {"label": "order_status"},
                              NUMBER_TEXT: {"label": "billing"}},
        "embedder": {t: {"embedding": [0.1] * 384} for t in texts},
        "kb-index": {t: {"passages": ["Refunds take 5 days.", "We ship with UPS."]} for t in texts},
    }
    # The SQL tool: only where its `when` holds (an order-status label and a number).
    sql = probes(config, "sql-executor", manifest(config, "sql-executor"), texts, answers)
    assert [p.text for p in sql] == [ORDER_TEXT]
    assert b"1042" in bytes(np.asarray(sql[0].inputs["params"]).reshape(-1)[0])
    answers["sql-executor"] = {ORDER_TEXT: {"rows": '[{"order_id": 1042, "status": "shipped"}]'}}
    # The LLM: the node's prompt, with the passages and the order row (none where skipped).
    llm = probes(config, "dialogue-llm", manifest(config, "dialogue-llm"), texts, answers)
    prompts = {p.text: bytes(np.asarray(next(iter(p.inputs.values()))).reshape(-1)[0]).decode() for p in llm}
    assert "Knowledge: Refunds take 5 days. We ship with UPS." in prompts[ORDER_TEXT]
    assert '"status": "shipped"' in prompts[ORDER_TEXT] and f"Customer: {ORDER_TEXT}" in prompts[ORDER_TEXT]
    assert "Order: none" in prompts[PLAIN_TEXT]
    assert llm[0].params["max_tokens"] == 48
    # The vector index gets the embedder's vector, not a text.
    kb = probes(config, "kb-index", manifest(config, "kb-index"), texts, answers)
    assert np.asarray(next(iter(kb[0].inputs.values()))).dtype == np.float32


def test_a_downstream_model_without_its_upstream_answers_is_refused_by_name(demo_store: Path) -> None:
    _, config = demo_config(demo_store)
    with pytest.raises(ValueError, match="needs embedder's answers"):
        probes(config, "kb-index", manifest(config, "kb-index"), [ORDER_TEXT], {})


def test_the_branches_read_by_when_are_recorded_per_text_and_as_a_distribution(demo_store: Path) -> None:
    _, config = demo_config(demo_store)
    assert when_fields(config, "intent-classifier") == {"label"}
    assert when_fields(config, "embedder") == set()
    by_text, dist = _branches({"label"}, {"a": {"label": "order_status", "score": 0.9},
                                          "b": {"label": "billing"}, "c": {"label": "order_status"}})
    assert by_text == {"a": {"label": "order_status"}, "b": {"label": "billing"}, "c": {"label": "order_status"}}
    assert dist == {"label": {"order_status": pytest.approx(2 / 3), "billing": pytest.approx(1 / 3)}}


def test_the_simulator_takes_the_measured_branch_for_a_listed_text() -> None:
    out = Outputs({"label": {"billing": 1.0}}, {ORDER_TEXT: {"label": "order_status"}})
    rng = random.Random(0)
    assert out.values[out.choose(ORDER_TEXT, rng)] == {"label": "order_status"}
    assert all(out.values[out.choose(PLAIN_TEXT, rng)] == {"label": "billing"} for _ in range(20))
    profile = parse_profiles({"models": {"m": {"latency_ms": {1: 5},
                                               "outputs_by_text": {ORDER_TEXT: {"label": "order_status"}}}}})
    assert profile.models["m"].outputs_by_text[ORDER_TEXT] == {"label": "order_status"}


def test_scenario_texts_reach_every_model_of_a_class() -> None:
    data = yaml.safe_load((REPO / "compose" / "mesh.yaml").read_text())
    config = parse_config({**data, "store": "/nonexistent"}, "demo")
    texts = scenario_texts(load_scenario(REPO / "loadtest" / "scenarios" / "spike10x.yaml"), config)
    assert ORDER_TEXT in texts["dialogue-llm"] and ORDER_TEXT in texts["sql-executor"]
    assert "code-llm" in texts


def test_cmesh_profile_measures_a_branch_and_the_tool_behind_it_on_real_replicas(demo_store: Path,
                                                                                   tmp_path: Path) -> None:
    data, config = demo_config(demo_store)
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump(data))
    texts = {m: [ORDER_TEXT, PLAIN_TEXT] for m in ("intent-classifier", "sql-executor")}
    profiles = measure(config, path, ["sql-executor", "intent-classifier"], cold_starts=1, repeats=1,
                       cores=2.0, texts=texts, log=lambda line: None)
    intent, sql = profiles.models["intent-classifier"], profiles.models["sql-executor"]
    # The real classifier's label per text, which the SQL node's `when` reads ...
    assert intent.outputs_by_text[ORDER_TEXT] == {"label": "order_status"}
    assert set(intent.outputs["label"]) == {v["label"] for v in intent.outputs_by_text.values()}
    # ... and the SQL tool, measured with the query and order id its node sends.
    assert sql.measured["texts"] == 1 and min(sql.latency_ms.values()) > 0
    assert sql.measured["by"] == "cmesh profile"
    # Started as the mesh starts replicas (the local provider's fork server): timed from asking to ready.
    assert len(sql.measured["cold_starts_s"]) == 1 and sql.cold_start_s > 0
