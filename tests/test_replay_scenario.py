"""Trace-replay scenarios, pure: parsing and validation, and the open-loop schedule
(determinism, rate shapes, burstiness, the diurnal mix, time compression)."""
from pathlib import Path

import numpy as np
import pytest

from cmesh.config import load_config
from loadtest.scenario import (ScenarioError, arrivals, expected_count, load_scenario, parse_scenario,
                               rate_at)

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = REPO / "loadtest" / "scenarios"
NAMES = ("steady", "diurnal", "spike10x", "cv2x")


def shipped(name: str):
    return load_scenario(SCENARIOS / f"{name}.yaml")


def flat(rate: float, duration: float, process: dict | None = None, seed: int = 5, **cls) -> dict:
    return {"name": "t", "seed": seed, "duration_s": duration, "process": process or {"kind": "poisson"},
            "classes": [{"name": "c", "model": "m", "rate_per_s": rate, **cls}]}


def gaps_cv(times: list[float]) -> float:
    gaps = np.diff(np.asarray(times))
    return float(gaps.std() / gaps.mean())


def count_in(schedule, lo: float, hi: float, **match) -> int:
    return sum(lo <= a.scenario_t_s < hi and all(getattr(a, k) == v for k, v in match.items()) for a in schedule)


@pytest.mark.parametrize("name", NAMES)
def test_shipped_scenarios_parse_and_target_what_the_demo_mesh_serves(name) -> None:
    scenario = shipped(name)
    mesh = load_config(REPO / "compose" / "mesh.yaml")
    assert scenario.name == name and scenario.classes
    for cls in scenario.classes:
        if cls.pipeline is not None:
            assert cls.pipeline in mesh.pipelines, cls.name
        else:
            assert cls.model in mesh.models and cls.input == "text", cls.name
    schedule = arrivals(scenario)
    assert len(schedule) == pytest.approx(expected_count(scenario), rel=0.15)
    assert {a.target for a in schedule} == {c.target for c in scenario.classes}


def test_the_schedule_is_deterministic_by_seed_and_in_time_order() -> None:
    scenario = shipped("steady")
    one, two = arrivals(scenario), arrivals(scenario)
    assert one == two
    assert all(a.t_s <= b.t_s for a, b in zip(one, one[1:]))
    other = arrivals(scenario.model_copy(update={"seed": scenario.seed + 1}))
    assert [a.t_s for a in other[:50]] != [a.t_s for a in one[:50]]


def test_a_class_schedule_does_not_depend_on_the_other_classes() -> None:
    scenario = shipped("steady")
    alone = scenario.model_copy(update={"classes": scenario.classes[:1]})
    first = scenario.classes[0].name
    assert [a.t_s for a in arrivals(alone)] == [a.t_s for a in arrivals(scenario) if a.class_name == first]


def test_spike10x_has_ten_times_the_arrivals_during_its_minute() -> None:
    scenario = shipped("spike10x")
    schedule = arrivals(scenario)
    seg = scenario.shapes["burst"][0]
    assert (seg.from_s, seg.to_s, seg.multiplier) == (120, 180, 10)
    in_spike = count_in(schedule, 120, 180) / 60
    outside = (count_in(schedule, 0, 120) + count_in(schedule, 180, scenario.duration_s)) / (scenario.duration_s - 60)
    assert in_spike / outside == pytest.approx(10, rel=0.15)
    cls = scenario.classes[0]
    assert rate_at(scenario, cls, 150) == pytest.approx(10 * rate_at(scenario, cls, 30))


@pytest.mark.parametrize("process", [{"kind": "poisson"}, {"kind": "gamma", "cv": 2.0}])
def test_arrivals_follow_a_linear_ramp_for_both_processes(process) -> None:
    data = flat(10.0, 1000, process, shape="ramp")
    data["shapes"] = {"ramp": [{"from_s": 0, "to_s": 1000, "multiplier": 0, "end_multiplier": 2}]}
    schedule = arrivals(parse_scenario(data))
    first, second = count_in(schedule, 0, 500), count_in(schedule, 500, 1000)
    assert first == pytest.approx(2500, rel=0.15) and second == pytest.approx(7500, rel=0.1)
    assert count_in(schedule, 0, 100) < count_in(schedule, 900, 1000) / 5


def test_cv2x_doubles_the_inter_arrival_cv_of_steady() -> None:
    poisson = arrivals(parse_scenario(flat(20.0, 1500)))
    gamma = arrivals(parse_scenario(flat(20.0, 1500, {"kind": "gamma", "cv": 2.0})))
    assert gaps_cv([a.t_s for a in poisson]) == pytest.approx(1.0, abs=0.05)
    assert gaps_cv([a.t_s for a in gamma]) == pytest.approx(2.0, abs=0.2)
    assert len(gamma) == pytest.approx(30000, rel=0.1)           # same mean rate
    steady, cv2x = arrivals(shipped("steady")), arrivals(shipped("cv2x"))
    for cls in ("embed", "intent"):                              # per class: a merged stream is smoother
        s = gaps_cv([a.t_s for a in steady if a.class_name == cls])
        c = gaps_cv([a.t_s for a in cv2x if a.class_name == cls])
        assert s == pytest.approx(1.0, abs=0.15) and c == pytest.approx(2.0, abs=0.45) and c > 1.5 * s


def test_the_diurnal_mix_shifts_from_batch_at_night_to_interactive_by_day() -> None:
    schedule = arrivals(shipped("diurnal"))

    def batch_share(lo: float, hi: float) -> float:
        return count_in(schedule, lo, hi, latency_class="batch") / count_in(schedule, lo, hi)

    night, day = batch_share(0, 900), batch_share(1350, 2550)      # clock 00-06 vs 09-17
    assert night > 0.7 and day < 0.3
    assert count_in(schedule, 1350, 2550, target="support-agent") > 4 * count_in(schedule, 0, 1200,
                                                                                  target="support-agent")


def test_compression_scales_times_and_keeps_the_requests() -> None:
    scenario = shipped("spike10x")
    plain, fast = arrivals(scenario, 1.0), arrivals(scenario, 10.0)
    assert len(plain) == len(fast)
    assert [a.t_s / 10 for a in plain] == pytest.approx([a.t_s for a in fast])
    assert [a.scenario_t_s for a in plain] == [a.scenario_t_s for a in fast]
    assert [(a.target, a.payload_text) for a in plain] == [(a.target, a.payload_text) for a in fast]
    with pytest.raises(ScenarioError, match="compress"):
        arrivals(scenario, 0)


@pytest.mark.parametrize("process", [{"kind": "poisson"}, {"kind": "gamma", "cv": 2.0}])
def test_rate_scale_thins_every_class_and_keeps_the_shape(process) -> None:
    scenario = shipped("spike10x").model_copy(update={"process": parse_scenario(
        {**flat(1.0, 1), "process": process}).process})
    full, third = arrivals(scenario, 3.0), arrivals(scenario, 3.0, rate_scale=1 / 3)
    assert len(third) == pytest.approx(len(full) / 3, rel=0.1)
    # Same requests per wall second as the uncompressed scenario, and still a 10x burst.
    assert len(third) / (scenario.duration_s / 3) == pytest.approx(expected_count(scenario) / scenario.duration_s,
                                                                  rel=0.1)
    assert count_in(third, 120, 180) / 60 == pytest.approx(10 * count_in(third, 0, 120) / 120, rel=0.25)
    assert {a.class_name for a in third} == {a.class_name for a in full}
    with pytest.raises(ScenarioError, match="rate_scale"):
        arrivals(scenario, 1.0, rate_scale=0)


def test_arrivals_carry_what_the_replayer_sends() -> None:
    data = flat(50.0, 2, texts=["alpha", "beta"], params={"poison": True}, latency_class="batch")
    data["classes"].append({"pipeline": "support-agent", "rate_per_s": 50.0})
    schedule = arrivals(parse_scenario(data))
    model = [a for a in schedule if a.target_kind == "model"]
    pipe = [a for a in schedule if a.target_kind == "pipeline"]
    assert model and pipe
    assert {a.payload_text for a in model} == {"alpha", "beta"}
    assert all(a.params == {"poison": True} and a.latency_class == "batch" and a.input_name == "text"
               and a.pipeline_id == "replay-t" for a in model)
    assert all(a.class_name == "support-agent-interactive" and a.pipeline_id == "support-agent" for a in pipe)


def bad(**changes) -> dict:
    data = flat(1.0, 10)
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = data
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[leaf] = value
    return data


@pytest.mark.parametrize("data, field", [
    (bad(classes__0__rate_per_s=0), "classes.0.rate_per_s: must be > 0"),
    (bad(classes__0__pipeline="support-agent"), "classes.0.pipeline: give exactly one"),
    (bad(classes__0__model=None), "classes.0.pipeline: give exactly one"),
    (bad(classes__0__latency_class="urgent"), "classes.0.latency_class"),
    (bad(classes__0__shape="nope"), "classes.0.shape: unknown shape 'nope'"),
    (bad(classes__0__colour="red"), "classes.0.colour: unknown field"),
    (bad(duration_s=-1), "duration_s: must be > 0"),
    (bad(process={"kind": "poisson", "cv": 2}), "process.cv"),
    (bad(process={"kind": "gamma", "cv": 0}), "process.cv: must be > 0"),
    (bad(shapes={"s": [{"from_s": 0, "to_s": 20, "multiplier": 2}]}), "shapes.s.0.to_s: must be <= duration_s"),
    (bad(shapes={"s": [{"from_s": 5, "to_s": 2, "multiplier": 2}]}), "shapes.s.0.to_s: must be > from_s"),
    (bad(shapes={"s": [{"from_s": 0, "to_s": 5, "multiplier": 1},
                       {"from_s": 4, "to_s": 6, "multiplier": 1}]}), "shapes.s.1.from_s: overlaps"),
    (bad(shapes={"s": [{"from_s": 0, "to_s": 5, "multiplier": -1}]}), "shapes.s.0.multiplier: must be >= 0"),
    (bad(classes=[{"model": "m", "rate_per_s": 1}, {"model": "m", "rate_per_s": 2}]),
     "classes.1.name: duplicate class name 'm-interactive'"),
    (bad(classes=[]), "classes"),
])
def test_validation_errors_name_the_field(data, field) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data, source="x.yaml")
    assert field in str(info.value) and "x.yaml" in str(info.value)


def test_missing_fields_bad_yaml_and_unreadable_files_are_clear(tmp_path) -> None:
    data = flat(1.0, 10)
    del data["seed"]
    with pytest.raises(ScenarioError, match="seed: is required"):
        parse_scenario(data)
    with pytest.raises(ScenarioError, match="not valid YAML"):
        parse_scenario("classes: [")
    with pytest.raises(ScenarioError, match="top level must be a mapping"):
        parse_scenario("- 1\n- 2\n")
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "missing.yaml")
