"""The pure cost report: grouping, pricing, errors, formatting, proto round trip."""
import json

import pytest

from cmesh.config import parse_config
from cmesh.cost import (CostLine, build_report, format_table, report_from_proto, report_to_proto,
                        to_json)
from protos import mesh_pb2
from router.metering import MeterRow

CONFIG = parse_config({"models": {
    "embedder": {"source": "store://minilm-l6/1", "price": {"replica_second": 0.001}},
    "llm": {"variants": {"a": {"source": "store://tiny-llm/1"}, "b": {"source": "store://tiny-llm/2"}},
            "price": {"replica_second": 0.01, "per_1k_tokens": 0.5}}}})


def row(tenant="acme", pipeline="support", model="embedder", variant="default", status="OK",
        requests=1, input_tokens=0, output_tokens=0, compute_s=0.0, latency_class="interactive"):
    return MeterRow(tenant=tenant, pipeline=pipeline, model=model, variant=variant,
                    latency_class=latency_class, status=status, requests=requests,
                    input_tokens=input_tokens, output_tokens=output_tokens,
                    compute_ns=round(compute_s * 1e9))


ROWS = [
    row(model="embedder", requests=10, input_tokens=100, compute_s=2.0),               # 0.002
    row(model="embedder", status="UNAVAILABLE", requests=2, compute_s=0.0),           # 0
    row(model="llm", variant="a", requests=4, input_tokens=1000, output_tokens=1000,
        compute_s=3.0),                                                              # 0.03 + 1.0
    row(model="llm", variant="b", tenant="globex", pipeline="", requests=1,
        input_tokens=200, output_tokens=0, compute_s=1.0, status="DEADLINE_EXCEEDED"),  # 0.01 + 0.1
    row(model="ghost", tenant="globex", pipeline="", requests=5, input_tokens=50,
        compute_s=9.0),                                                              # unknown: 0
]


def by_key(report):
    return {line.key: line for line in report.rows}


def test_pricing_math_per_model() -> None:
    lines = by_key(build_report(ROWS, CONFIG, "model"))
    assert lines["embedder"].cost == pytest.approx(2.0 * 0.001)
    assert lines["llm"].cost == pytest.approx(4.0 * 0.01 + 2.2 * 0.5)
    assert lines["ghost"].cost == 0.0 and lines["ghost"].requests == 5      # unpriced, still shown
    assert lines["ghost"].compute_s == pytest.approx(9.0)


def test_grouping_keys() -> None:
    assert set(by_key(build_report(ROWS, CONFIG, "pipeline"))) == {"support", "(none)"}
    assert set(by_key(build_report(ROWS, CONFIG, "tenant"))) == {"acme", "globex"}
    assert set(by_key(build_report(ROWS, CONFIG, "variant"))) == {
        "embedder:default", "llm:a", "llm:b", "ghost:default"}
    pipelines = by_key(build_report(ROWS, CONFIG, "pipeline"))
    assert pipelines["(none)"].requests == 6
    assert pipelines["(none)"].input_tokens == 250


def test_errors_count_non_ok_requests() -> None:
    lines = by_key(build_report(ROWS, CONFIG, "variant"))
    assert (lines["embedder:default"].requests, lines["embedder:default"].errors) == (12, 2)
    assert lines["llm:b"].errors == 1 and lines["llm:a"].errors == 0
    assert build_report(ROWS, CONFIG, "model").total.errors == 3


def test_totals_and_order() -> None:
    report = build_report(ROWS, CONFIG, "variant")
    assert [line.key for line in report.rows] == [
        "llm:a", "llm:b", "embedder:default", "ghost:default"]              # cost desc, then key
    total = report.total
    assert total.key == "total"
    assert total.requests == 22 and total.input_tokens == 1350 and total.output_tokens == 1000
    assert total.compute_s == pytest.approx(15.0)
    assert total.cost == pytest.approx(sum(line.cost for line in report.rows))
    # Equal-cost lines are ordered by key.
    tie = build_report([row(tenant="b"), row(tenant="a")], CONFIG, "tenant")
    assert [line.key for line in tie.rows] == ["a", "b"]


def test_unknown_group_by_is_refused() -> None:
    with pytest.raises(ValueError, match="group_by"):
        build_report(ROWS, CONFIG, "region")


def test_empty_report() -> None:
    report = build_report([], CONFIG, "tenant")
    assert report.rows == () and report.total == CostLine(key="total")
    text = format_table(report)
    assert "no metered requests" in text and text.splitlines()[-1].startswith("total")


def test_table_is_aligned_with_a_total_line() -> None:
    report = build_report(ROWS, CONFIG, "variant")
    lines = format_table(report).splitlines()
    assert lines[0].split() == ["variant", "requests", "errors", "input_tokens", "output_tokens",
                                "compute_s", "cost"]
    assert lines[1].startswith("llm:a") and lines[-1].startswith("total")
    assert set(lines[-2]) == {"-"}
    data = [lines[0], *lines[1:-2], lines[-1]]
    assert len({len(line) for line in data}) == 1           # right-aligned numbers: equal widths
    assert lines[1].split()[-1] == "1.030000"                 # llm:a: 3 s x 0.01 + 2k tokens x 0.5
    assert lines[-1].split()[1] == "22"


def test_json_shape() -> None:
    data = to_json(build_report(ROWS, CONFIG, "tenant"))
    json.dumps(data)                                         # serialisable as is
    assert data["group_by"] == "tenant"
    assert [r["key"] for r in data["rows"]] == ["acme", "globex"]
    assert set(data["rows"][0]) == {"key", "requests", "errors", "input_tokens", "output_tokens",
                                    "compute_s", "cost", "external_compute_s"}
    assert data["total"]["requests"] == 22


def test_proto_round_trip() -> None:
    for group_by in ("pipeline", "tenant", "model", "variant"):
        report = build_report(ROWS, CONFIG, group_by)
        message = report_to_proto(report)
        assert isinstance(message, mesh_pb2.CostReportResponse)
        wire = mesh_pb2.CostReportResponse.FromString(message.SerializeToString())
        assert report_from_proto(wire) == report
    message = report_to_proto(build_report(ROWS, CONFIG, "model"))
    assert message.total_cost == pytest.approx(0.002 + 1.14)
    assert [r.key for r in message.rows][0] == "llm"


def test_idle_capacity_is_replica_time_no_request_used() -> None:
    from cmesh.config import parse_config
    from cmesh.cost import format_idle, idle_capacity

    config = parse_config({"models": {"e": {"source": "s", "price": {"replica_second": 0.01}},
                                      "f": {"source": "s"}}})
    lines = {line.model: line for line in idle_capacity({"e": 100.0, "f": 5.0}, {"e": 20.0, "f": 9.0}, config)}
    assert (lines["e"].idle_s, lines["e"].idle_cost) == (80.0, 0.8)
    assert lines["f"].idle_s == 0.0                    # busier than its replica time: never negative
    assert "idle capacity" in format_idle(list(lines.values()))


def test_tokens_priced_per_direction_with_per_1k_tokens_the_default_of_each() -> None:
    from cmesh.cost import price

    cfg = parse_config({"models": {
        "gpt": {"backend": {"kind": "openai", "base_url": "https://api.example/v1"},
                "price": {"per_1k_input_tokens": 0.15, "per_1k_output_tokens": 0.6}},
        "half": {"source": "store://m/1", "price": {"per_1k_tokens": 0.2, "per_1k_output_tokens": 1.0}},
        "flat": {"source": "store://m/1", "price": {"per_1k_tokens": 0.5, "replica_second": 0.01}}}})
    assert price(cfg, "gpt", 3.0, 2000, 1000) == pytest.approx(2 * 0.15 + 0.6)
    assert price(cfg, "half", 0.0, 1000, 1000) == pytest.approx(0.2 + 1.0)
    assert price(cfg, "flat", 2.0, 1000, 1000) == pytest.approx(0.02 + 2 * 0.5)
    lines = by_key(build_report([row(model="gpt", input_tokens=4000, output_tokens=500, compute_s=1.0)], cfg, "model"))
    assert lines["gpt"].cost == pytest.approx(4 * 0.15 + 0.5 * 0.6)
