"""Placement: first-fit decreasing by memory, slots, refusals, utilisation."""
import pytest

from autoscaler.placement import (DeviceUsage, Placed, ReplicaRequest, check_fits, place,
                                  replica_request, utilisation)
from cmesh.config import DeviceConfig, load_config, parse_config
from cmesh.validation import ConfigError
from meshtest import REPO


def dev(name: str, mb: int, kind: str = "cpu", slots: int | None = None) -> DeviceConfig:
    return DeviceConfig(name=name, kind=kind, memory_mb=mb, max_replicas=slots)


def req(model: str, mb: int, kind: str | None = None) -> ReplicaRequest:
    return ReplicaRequest(model, mb, kind)


def test_first_fit_decreasing_packs_largest_first() -> None:
    devices = [dev("d0", 1000), dev("d1", 1000)]
    # In arrival order first-fit would put 300+300 on d0, then 700 on d1, and refuse
    # the last 700; largest first fits all four.
    requests = [req("s1", 300), req("s2", 300), req("l1", 700), req("l2", 700)]
    result = place(requests, devices)
    assert result.refused == []
    assert [(r.model, d) for r, d in result.placed] == [("l1", "d0"), ("l2", "d1"), ("s1", "d0"), ("s2", "d1")]


def test_existing_replicas_take_their_memory() -> None:
    devices = [dev("d0", 1000), dev("d1", 1000)]
    existing = [Placed("x", "d0", 800), Placed("ghost", "gone", 5000)]     # unknown device ignored
    result = place([req("a", 300)], devices, existing)
    assert [(r.model, d) for r, d in result.placed] == [("a", "d1")]


def test_refusal_says_what_was_needed_and_what_was_free() -> None:
    devices = [dev("cpu0", 8192), dev("cpu1", 4096)]
    existing = [Placed("big", "cpu0", 7780), Placed("big", "cpu1", 3900)]
    result = place([req("x", 900)], devices, existing)
    assert result.placed == []
    (r, reason), = result.refused
    assert r.model == "x"
    assert reason == "model 'x' needs 900 MB; largest free: cpu0 412 MB of 8192 MB"


def test_slots_limit_replicas_per_device() -> None:
    devices = [dev("d0", 10_000, slots=2), dev("d1", 10_000, slots=1)]
    result = place([req("m", 10)] * 4, devices)
    assert [d for _, d in result.placed] == ["d0", "d0", "d1"]
    (_, reason), = result.refused
    assert reason == "model 'm' needs 10 MB; every device is out of replica slots (d0 2 of 2, d1 1 of 1)"


def test_slots_count_existing_replicas() -> None:
    result = place([req("m", 10)], [dev("d0", 10_000, slots=1)], [Placed("o", "d0", 10)])
    assert result.placed == [] and "out of replica slots" in result.refused[0][1]


def test_device_kind_is_respected() -> None:
    devices = [dev("cpu0", 100_000), dev("gpu0", 16_000, kind="cuda")]
    result = place([req("g", 2000, "cuda"), req("c", 2000, "cpu"), req("any", 50_000)], devices)
    assert {(r.model, d) for r, d in result.placed} == {("any", "cpu0"), ("g", "gpu0"), ("c", "cpu0")}
    result = place([req("g", 2000, "cuda")], [dev("cpu0", 100_000)])
    assert result.refused[0][1] == "model 'g' needs 2000 MB on a cuda device; none is declared"


def test_placement_is_deterministic_on_ties() -> None:
    devices = [dev("d0", 100), dev("d1", 100)]
    a = place([req("b", 60), req("a", 60)], devices)
    assert [(r.model, d) for r, d in a.placed] == [("a", "d0"), ("b", "d1")]


def test_utilisation_per_device() -> None:
    devices = [dev("cpu0", 8192), dev("gpu0", 16000, kind="cuda", slots=4)]
    first = place([req("e", 300), req("l", 400), req("g", 2000, "cuda")], devices)
    placed = first.as_placed() + [Placed("old", "nowhere", 10)]
    assert utilisation(devices, placed) == [
        DeviceUsage("cpu0", "cpu", 8192, 700, 2),
        DeviceUsage("gpu0", "cuda", 16000, 2000, 1),
    ]


def test_replica_request_from_config() -> None:
    cfg = load_config(REPO / "compose" / "mesh.yaml")
    assert replica_request("embedder", cfg.models["embedder"]) == ReplicaRequest("embedder", 300, "cpu")
    m = parse_config({"models": {"g": {"source": "s", "resources": {"device": "cuda:1"}}}}).models["g"]
    assert replica_request("g", m, manifest_memory_mb=1234) == ReplicaRequest("g", 1234, "cuda")
    assert replica_request("g", m).memory_mb == 64


def test_check_fits_demo_config() -> None:
    check_fits(load_config(REPO / "compose" / "mesh.yaml"))


def test_check_fits_names_the_field() -> None:
    cfg = parse_config({
        "devices": [{"name": "cpu0", "memory_mb": 1024}, {"name": "cpu1", "memory_mb": 2048}],
        "models": {"huge": {"source": "s", "resources": {"memory_mb": 4096}},
                   "ok": {"source": "s", "resources": {"memory_mb": 2048}},
                   "gpu": {"source": "s", "resources": {"device": "cuda"}},
                   "est": {"source": "s"}},
    })
    with pytest.raises(ConfigError) as info:
        check_fits(cfg, estimates={"est": 3000})
    assert info.value.errors == [
        "models.huge.resources.memory_mb: 4096 MB fits on no device (largest cpu device: cpu1 2048 MB)",
        "models.gpu.resources.device: needs a cuda device; none is declared under devices",
        "models.est.resources.memory_mb: 3000 MB fits on no device (largest cpu device: cpu1 2048 MB)",
    ]
