"""Trace replay against an in-process router and model server (sleep / identity engines)
and a fake autoscaler: outputs, accounting (nothing lost), forced failures recorded
with status and reason, client-side drops and drain timeouts."""
import asyncio
import json

import grpc
import pytest
import yaml

from loadtest import replay
from loadtest.replay import Record, ReplayOptions, ReplicaSample, integrate_replicas
from loadtest.scenario import arrivals, load_scenario
from meshtest import identity_text_model, mesh_config, running_router, running_server, sleep_model, write_version
from protos import mesh_pb2, mesh_pb2_grpc
from router.auth import Authenticator

VECTOR = "[1.0, 2.0, 3.0, 4.0]"
KEY = "replay-test-key"


class FakeAutoscaler(mesh_pb2_grpc.AutoscalerServicer):
    """Status only: echo has one ready and one warming replica, fast has two ready."""

    async def Status(self, request, context):
        status = mesh_pb2.StatusResponse(leader=True)
        echo = status.models.add(model="echo", mode="serverless", replica_seconds=1.0)
        echo.replicas.add(id="e1", state="ready")
        echo.replicas.add(id="e2", state="warming")
        fast = status.models.add(model="fast", mode="dedicated", replica_seconds=2.0)
        fast.replicas.add(id="f1", state="ready")
        fast.replicas.add(id="f2", state="ready")
        return status


@pytest.fixture()
async def fake_autoscaler():
    server = grpc.aio.server()
    mesh_pb2_grpc.add_AutoscalerServicer_to_server(FakeAutoscaler(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(0)


def write_scenario(path, classes: list[dict], duration_s: float, compress: float = 1.0):
    path.write_text(yaml.safe_dump({"name": "e2e", "seed": 3, "duration_s": duration_s, "compress": compress,
                                    "classes": classes}))
    return path


async def test_replay_writes_summary_and_plot_and_records_every_outcome(tmp_path, fake_autoscaler, capsys) -> None:
    sources = {"fast": sleep_model(tmp_path, "fast", sleep_ms=5), "echo": identity_text_model(tmp_path, "echo")}
    sources["bad"] = sources["echo"]
    backend_cfg = mesh_config(tmp_path, {m: {"source": s} for m, s in sources.items()})
    scenario = write_scenario(tmp_path / "e2e.yaml", [
        {"name": "agent", "pipeline": "p", "latency_class": "interactive", "rate_per_s": 8},
        {"name": "echo", "model": "echo", "latency_class": "batch", "rate_per_s": 8, "texts": ["hello", "world"]},
        {"name": "poisoned", "model": "bad", "rate_per_s": 2, "params": {"poison": True}},
        {"name": "unknown", "model": "no-such-model", "rate_per_s": 2},
    ], duration_s=4, compress=2)                      # 4 scenario s in 2 wall s
    async with running_server(backend_cfg, list(sources)) as backend:
        live = [f"127.0.0.1:{backend.port}"]
        cfg = mesh_config(tmp_path, {m: {"source": s, "endpoints": live} for m, s in sources.items()},
                          pipelines={"p": {"nodes": {"a": {"model": "fast", "input": VECTOR},
                                                     "b": {"model": "fast", "input": VECTOR, "after": ["a"]}}}},
                          tenants={"acme": {"api_keys_env": "REPLAY_KEYS", "rate_per_s": 10000}})
        async with running_router(cfg, auth=Authenticator.from_env(cfg, {"REPLAY_KEYS": KEY})) as router:
            out = tmp_path / "out"
            rc = await replay.main_async(["--scenario", str(scenario), "--target", f"127.0.0.1:{router.port}",
                                          "--autoscaler", fake_autoscaler, "--out", str(out), "--api-key", KEY])
        reg = backend.metrics.registry
        tagged = reg.get_sample_value("cmesh_model_pipeline_requests_total", {
            "model": "echo", "variant": "default", "pipeline": "replay-e2e", "latency_class": "batch"})
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads((out / "summary.json").read_text())
    totals = summary["totals"]
    assert json.loads(last) == totals                      # the last line: the summary's totals
    assert (out / "replay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    expected = len(arrivals(load_scenario(scenario), 2))
    assert totals["requests"] == expected and totals["lost"] == 0
    assert totals["ok"] + totals["errors"] + totals["drops"] == expected
    assert sum(g["count"] for g in summary["by_target"].values()) == expected
    assert sum(g["count"] for g in summary["by_latency_class"].values()) == expected
    assert len((out / "requests.jsonl").read_text().splitlines()) == expected

    by = summary["by_scenario_class"]
    for name in ("agent", "echo"):                          # the healthy classes all succeed
        assert by[name]["ok"] == by[name]["count"] > 0 and by[name]["p99_ms"] > 0
    assert summary["by_target_and_class"]["pipeline:p|interactive"]["ok"] == by["agent"]["count"]
    assert tagged == by["echo"]["count"]                   # cmesh-pipeline-id and latency class arrived
    poisoned = by["poisoned"]                              # INTERNAL, then the breaker opens: UNAVAILABLE
    assert poisoned["errors"] == poisoned["count"] > 0
    assert poisoned["errors_by_code"].get("INTERNAL", 0) >= 1
    assert set(poisoned["errors_by_code"]) <= {"INTERNAL", "UNAVAILABLE"}
    assert "INTERNAL: internal" in poisoned["reasons"]
    unknown = by["unknown"]
    assert unknown["errors_by_code"] == {"NOT_FOUND": unknown["count"]}
    assert unknown["reasons"] == {"NOT_FOUND: not_found": unknown["count"]}
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    bad = [r for r in records if r["class_name"] == "poisoned" and r["code"] == "INTERNAL"]
    assert bad and "poison" in bad[0]["message"] and bad[0]["latency_ms"] > 0
    assert all(r["start_s"] is not None and r["end_s"] >= r["start_s"] for r in records)

    replicas = summary["replicas"]
    assert replicas["samples"] >= 2 and replicas["sampler_errors"] == 0
    echo, fast = replicas["replica_seconds"]["echo"], replicas["replica_seconds"]["fast"]
    assert echo["ready"] > 0 and echo["all"] == pytest.approx(2 * echo["ready"], abs=0.01)
    assert fast["ready"] == pytest.approx(2 * echo["ready"], abs=0.01)
    assert summary["replica_seconds"] == {"echo": echo["ready"], "fast": fast["ready"]}
    assert replicas["max_ready"] == {"echo": 1, "fast": 2}
    assert len(replicas["timeline"]) == replicas["samples"]
    assert all(ready == {"echo": 1, "fast": 2} for _, ready in replicas["timeline"])


async def test_in_flight_limit_drops_and_drain_timeouts_are_recorded_not_lost(tmp_path) -> None:
    source = write_version(tmp_path, "slow", "1", engine="sleep",
                           inputs=[{"name": "text", "datatype": "BYTES", "shape": [-1]}],
                           outputs=[{"name": "echo", "datatype": "BYTES", "shape": [-1]}],
                           options={"sleep_ms": 1200}, max_batch_size=8, max_queue_delay_ms=1)
    backend_cfg = mesh_config(tmp_path, {"slow": {"source": source}})
    scenario = load_scenario(write_scenario(tmp_path / "slow.yaml", [
        {"model": "slow", "rate_per_s": 20}], duration_s=0.6))
    lines: list[str] = []
    async with running_server(backend_cfg, ["slow"]) as backend:
        cfg = mesh_config(tmp_path, {"slow": {"source": source, "endpoints": [f"127.0.0.1:{backend.port}"]}})
        async with running_router(cfg) as router:
            options = ReplayOptions(target=f"127.0.0.1:{router.port}", out=tmp_path / "out", max_in_flight=3,
                                    drain_timeout_s=0.2, log=lines.append)
            summary = await replay.run(options, scenario)
    totals = summary["totals"]
    count = len(arrivals(scenario))
    assert count > 3
    assert totals["requests"] == count and totals["lost"] == 0
    assert totals["drops"] == count - 3 and summary["drops"]["by_reason"] == {"client in-flight limit": count - 3}
    assert totals["timeouts"] == 3 and totals["errors_by_code"] == {"DEADLINE_EXCEEDED": 3}
    assert totals["ok"] == 0 and totals["p99_ms"] is None
    assert summary["replicas"] == {"sampled": False, "samples": 0, "sampler_errors": 0, "replica_seconds": {},
                                   "autoscaler_replica_seconds": {}, "max_ready": {}, "timeline": []}
    assert (tmp_path / "out" / "replay.png").exists()
    assert any("draining 3 in-flight" in line for line in lines)


def test_replica_seconds_hold_each_sample_until_the_next() -> None:
    samples = [ReplicaSample(0.0, {"m": {"ready": 1}}, {}), ReplicaSample(2.0, {"m": {"ready": 3, "warming": 1}}, {}),
               ReplicaSample(3.0, {}, {})]
    assert integrate_replicas(samples, end_s=10.0) == {"m": {"ready": 5.0, "all": 6.0}}
    assert integrate_replicas([], end_s=10.0) == {}


def test_a_record_keeps_its_first_outcome() -> None:
    r = Record(0, "c", "model", "m", "batch", scenario_t_s=1.0, scheduled_s=0.5, start_s=0.5)
    r.finish(0.75, "ok", "OK")
    r.finish(0.9, "error", "DEADLINE_EXCEEDED", "timeout")
    assert (r.outcome, r.code, r.latency_ms) == ("ok", "OK", 250.0)


async def test_a_bad_scenario_file_is_an_error_naming_the_field(tmp_path, capsys) -> None:
    path = write_scenario(tmp_path / "bad.yaml", [{"model": "m", "rate_per_s": -1}], duration_s=1)
    rc = await replay.main_async(["--scenario", str(path), "--target", "127.0.0.1:1"])
    assert rc == 2 and "classes.0.rate_per_s: must be > 0" in capsys.readouterr().err


async def test_an_unreachable_router_says_what_to_do(tmp_path) -> None:
    path = write_scenario(tmp_path / "s.yaml", [{"model": "m", "rate_per_s": 1}], duration_s=1)
    options = ReplayOptions(target="127.0.0.1:1", out=tmp_path / "out", connect_timeout_s=0.3, log=lambda s: None)
    with pytest.raises(ConnectionError, match="make up"):
        await asyncio.wait_for(replay.run(options, load_scenario(path)), 10)
