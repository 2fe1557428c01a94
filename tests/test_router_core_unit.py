"""The router core against fake backends (tests/fakes.py): no sockets, no model
server, no patching; each test takes milliseconds. The end-to-end versions of these
behaviours live in test_router_failures, test_router_routing and test_kserve_backend."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from cmesh.client import build_request
from cmesh.errors import MeshError
from router.auth import Principal
from router.call import Call
from router.core import RouterCore
from router.endpoints import EndpointTable, ReplicaInfo
from router.metering import MemoryMeter
from router.metrics import RouterMetrics
from router.trust_io import MemoryAudit, TrustLayer
from tests.fakes import FakeBackends, FakeClock, core_config, fail, served_by

X = {"x": np.ones((1, 4), dtype=np.float32)}


def make_core(models: dict, replicas: dict[str, list[ReplicaInfo]], *, clock=time.monotonic,
              backends: FakeBackends | None = None, warm=None, **router):
    config = core_config(models, **router)
    table = EndpointTable()
    table.replace(1, {m: tuple(r) for m, r in replicas.items()})
    metrics = RouterMetrics()
    warmed: list[str] = []

    async def default_warm(model: str) -> None:
        warmed.append(model)

    backends = backends or FakeBackends()
    core = RouterCore(config, table, MemoryMeter(), metrics, warm=warm or default_warm,
                      trust=TrustLayer(MemoryAudit(), metrics, config.server.limits), clock=clock,
                      backends=backends)
    core.warmed = warmed
    return core, table, backends


def call(core: RouterCore, request_id: str = "", timeout_s: float = 5.0, model: str = "m", **kw) -> Call:
    return Call(principal=Principal("acme"), model=model, request=build_request(model, X), request_id=request_id,
                deadline=core._now() + timeout_s, **kw)


def metric(core: RouterCore, name: str, **labels) -> float:
    return core.metrics.registry.get_sample_value(name, labels) or 0.0


SERVERLESS = {"m": {"source": "store://m/1"}}
AUTO = {"m": {"source": "store://m/1", "deployment": {"mode": "auto", "dedicated_replicas": 1,
                                                      "max_inflight_per_replica": 2,
                                                      "capacity_threshold": 0.5}}}


def reps(*addresses: str, pool: str = "serverless", kind: str = "mesh") -> list[ReplicaInfo]:
    return [ReplicaInfo(id=a, address=a, pool=pool, kind=kind) for a in addresses]


async def test_retry_goes_to_another_backend_before_the_response_started():
    core, _, backends = make_core(SERVERLESS, {"m": reps("a", "b")})
    backends["a"].script.append(fail("UNAVAILABLE"))      # equal load: "a" is tried first (by id)
    answer = await core.infer(call(core, "r2"))
    assert served_by(answer) == "b"
    assert answer.parameters["cmesh-attempts"].int64_param == 2
    await core.close()


async def test_no_retry_once_the_response_started():
    core, _, backends = make_core(SERVERLESS, {"m": reps("a", "b")})
    backends["a"].script.append(("stream", 1, fail("UNAVAILABLE")))
    got = []
    with pytest.raises(MeshError) as info:
        async for response in core.stream(call(core)):
            got.append(response)
    assert info.value.code.name == "UNAVAILABLE" and len(got) == 1
    assert not backends["b"].calls                     # never retried elsewhere
    assert metric(core, "cmesh_router_retries_denied_total", model="m", reason="response_started") == 1
    await core.close()


async def test_retry_budget_caps_extra_attempts():
    clock = FakeClock()
    core, _, backends = make_core(SERVERLESS, {"m": reps("a", "b", "c")}, clock=clock,
                                  retry={"max_attempts": 3, "budget_ratio": 0.0, "min_retries_per_s": 0.2,
                                         "backoff_ms": 0})
    for b in "abc":
        backends[b].default = fail("UNAVAILABLE")
    # The budget's floor allows 2 retries in its 10 s window (0.2/s), then none.
    errors = []
    for i in range(3):
        with pytest.raises(MeshError) as info:
            await core.infer(call(core, f"r{i}"))
        errors.append(info.value.code.name)
    attempts = sum(len(backends[b].calls) for b in "abc")
    assert errors == ["UNAVAILABLE"] * 3
    assert attempts == 3 + 2                           # three first tries, two retries: budget spent
    assert metric(core, "cmesh_router_retries_denied_total", model="m", reason="budget") >= 1
    await core.close()


async def test_not_retryable_codes_are_not_retried():
    core, _, backends = make_core(SERVERLESS, {"m": reps("a", "b")})
    backends["a"].default = backends["b"].default = fail("INVALID_ARGUMENT")
    with pytest.raises(MeshError) as info:
        await core.infer(call(core))
    assert info.value.code.name == "INVALID_ARGUMENT"
    assert len(backends["a"].calls) + len(backends["b"].calls) == 1
    await core.close()


async def test_breaker_opens_on_backend_failures_and_closes_after_a_good_probe():
    clock = FakeClock()
    core, _, backends = make_core(SERVERLESS, {"m": reps("a")}, clock=clock,
                                  breaker={"failure_threshold": 3, "cool_down_s": 5.0},
                                  retry={"max_attempts": 1})
    backends["a"].default = fail("INTERNAL")
    for i in range(3):
        with pytest.raises(MeshError):
            await core.infer(call(core, f"f{i}"))
    with pytest.raises(MeshError) as info:
        await core.infer(call(core, "open"))
    assert info.value.reason == "breaker_open" and info.value.code.name == "UNAVAILABLE"
    assert len(backends["a"].calls) == 3               # the open breaker sent nothing
    assert metric(core, "cmesh_router_breaker_state", component="m:default") == 2
    clock.advance(5.1)
    backends["a"].default = "ok"
    await core.infer(call(core, "probe"))      # half-open probe succeeds
    assert metric(core, "cmesh_router_breaker_state", component="m:default") == 0
    await core.infer(call(core, "after"))
    await core.close()


async def test_breaker_verdicts_ignore_bad_input_and_the_callers_own_deadline():
    clock = FakeClock()
    core, _, backends = make_core(SERVERLESS, {"m": reps("a")}, clock=clock,
                                  breaker={"failure_threshold": 2}, retry={"max_attempts": 1})
    backends["a"].default = fail("INVALID_ARGUMENT")
    for i in range(4):                                  # a sensible answer to bad input
        with pytest.raises(MeshError):
            await core.infer(call(core, f"bad{i}"))
    backends["a"].default = "ok"
    await core.infer(call(core, "good"))       # the breaker stayed closed
    assert metric(core, "cmesh_router_breaker_state", component="m:default") == 0
    await core.close()


async def test_outlier_ejection_takes_a_failing_backend_out_of_rotation():
    core, _, backends = make_core(SERVERLESS, {"m": reps("a", "b", "c", "d")},
                                  outlier={"consecutive_failures": 2, "base_ejection_s": 60,
                                           "max_ejection_fraction": 0.5},
                                  breaker={"failure_threshold": 100})
    backends["a"].default = fail("UNAVAILABLE")
    for i in range(6):
        answer = await core.infer(call(core, f"r{i}"))
        assert served_by(answer) != "a"
    assert core.outliers.is_ejected("a", core._now())
    assert metric(core, "cmesh_router_outlier_ejections_total", model="m") == 1
    calls_before = len(backends["a"].calls)
    for i in range(8):
        await core.infer(call(core, f"s{i}"))
    assert len(backends["a"].calls) == calls_before    # ejected: no more traffic
    await core.close()


async def test_spill_over_to_an_external_pool_when_the_dedicated_pool_is_past_its_threshold():
    backends = FakeBackends(external={"oip-1"})
    gate = asyncio.Event()
    core, _, backends = make_core(AUTO, {"m": [*reps("mesh-1", pool="dedicated"),
                                               *reps("oip-1", pool="serverless", kind="oip")]},
                                  backends=backends)
    backends["mesh-1"].default = gate                   # hold the dedicated replica busy
    first = asyncio.create_task(core.infer(call(core, "r1")))
    await asyncio.sleep(0)
    second = await core.infer(call(core, "r2"))   # 1 of 2 in flight = threshold
    assert served_by(second) == "oip-1"
    assert metric(core, "cmesh_router_spillover_total", model="m") == 1
    gate.set()
    assert served_by(await first) == "mesh-1"
    await core.flush_metering()
    rows = {r.model: r for r in await core.meter.rows()}
    assert rows["m"].requests == 2
    assert rows["m"].external_compute_ns > 0           # the oip pool's wall time, marked external
    assert rows["m"].compute_ns > rows["m"].external_compute_ns
    await core.close()


async def test_hold_at_zero_replicas_then_release_when_one_is_ready():
    core, table, backends = make_core(SERVERLESS, {})
    task = asyncio.create_task(core.infer(call(core, "held")))
    for _ in range(20):
        await asyncio.sleep(0)
        if core.warmed:
            break
    assert core.warmed == ["m"] and core.dispatchers["m"].holding
    table.replace(2, {"m": tuple(reps("late"))})
    answer = await asyncio.wait_for(task, 2)
    assert served_by(answer) == "late"
    assert answer.parameters["cmesh-cold-start-ms"].string_param   # the wait is a cold start
    await core.close()


async def test_hold_ends_unavailable_at_the_deadline():
    core, _, _ = make_core(SERVERLESS, {}, hold_timeout_s=0.05)
    with pytest.raises(MeshError) as info:
        await core.infer(call(core, "held", timeout_s=0.05))
    assert info.value.code.name == "UNAVAILABLE" and info.value.reason == "no_replica"
    await core.close()


async def test_every_request_is_metered_exactly_once_by_request_id():
    core, _, backends = make_core(SERVERLESS, {"m": reps("a", "b")}, retry={"backoff_ms": 0})
    backends["a"].script.append(fail("UNAVAILABLE"))    # r1 needs a retry: still one event
    await core.infer(call(core, "r1"))
    await core.infer(call(core, "r1"))      # a client's own retry, same id
    backends["a"].default = backends["b"].default = fail("INTERNAL")
    with pytest.raises(MeshError):
        await core.infer(call(core, "r2"))
    await core.flush_metering()
    rows = await core.meter.rows()
    assert {(r.status, r.requests) for r in rows} == {("OK", 1), ("INTERNAL", 1)}
    await core.close()


async def test_unary_answers_carry_no_stream_marker_and_timings_are_text():
    core, _, backends = make_core(SERVERLESS, {"m": reps("a")})
    answer = await core.infer(call(core))
    assert "triton_final_response" not in answer.parameters
    for key in ("cmesh-router-queue-ms", "cmesh-compute-ms"):
        assert answer.parameters[key].WhichOneof("parameter_choice") == "string_param"
        float(answer.parameters[key].string_param)
    await core.close()
