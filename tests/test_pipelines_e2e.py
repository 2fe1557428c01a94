"""Pipelines through a real router and model server (timing-only sleep models):
parallel fan-out, `when`, degradation, required failures, fallback, the deadline
budget, propagation of pipeline id and latency class, and metering per node."""
import grpc
import pytest

from cmesh.errors import component_error_of
from meshtest import free_port, mesh_config, running_router, running_server, sleep_model
from protos import mesh_pb2, mesh_pb2_grpc
from router.metering import MemoryMeter

VECTOR = "[1.0, 2.0, 3.0, 4.0]"


def node(model: str, **kw) -> dict:
    return {"model": model, "input": VECTOR, **kw}


@pytest.fixture()
async def mesh(tmp_path):
    """A model server with slow/fast sleep models; `make(pipelines, dead=...)` starts a router."""
    sources = {"fast": sleep_model(tmp_path, "fast", sleep_ms=5), "slow": sleep_model(tmp_path, "slow", sleep_ms=80),
               "slower": sleep_model(tmp_path, "slower", sleep_ms=150),
               "other": sleep_model(tmp_path, "other", sleep_ms=5)}
    backend_cfg = mesh_config(tmp_path, {m: {"source": s} for m, s in sources.items()})
    async with running_server(backend_cfg, list(sources)) as backend:
        live = [f"127.0.0.1:{backend.port}"]

        def make(pipelines: dict, **router):
            models = {m: {"source": s, "endpoints": live} for m, s in sources.items()}
            models["dead"] = {"source": sources["fast"], "endpoints": [f"127.0.0.1:{free_port()}"]}
            meter = MemoryMeter()
            return running_router(mesh_config(tmp_path, models, pipelines=pipelines, router=router),
                                  meter=meter), meter, backend

        yield make


async def run(router, pipeline: str, timeout: float = 20.0, **inputs) -> mesh_pb2.RunResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
        return await mesh_pb2_grpc.PipelinesStub(channel).Run(
            mesh_pb2.RunRequest(pipeline=pipeline, inputs=inputs or {"text": "hi"}, request_id="req-1"),
            timeout=timeout)


def spans(response) -> dict:
    return {n.node: n for n in response.trace.nodes}


async def test_independent_nodes_run_concurrently_and_the_critical_path_is_marked(mesh) -> None:
    routing, meter, backend = mesh({"p": {"nodes": {"a": node("slow"), "b": node("slow"), "c": node("fast"),
                                                     "d": node("fast", after=["a", "b", "c"])}, "output": "d"}})
    async with routing as router:
        response = await run(router, "p")
    s = spans(response)
    for x, y in (("a", "b"), ("a", "c"), ("b", "c")):        # started together, overlapping in time
        assert s[x].start_ms < s[y].end_ms and s[y].start_ms < s[x].end_ms, (x, y)
    assert s["d"].start_ms >= max(s["a"].end_ms, s["b"].end_ms, s["c"].end_ms)
    assert response.trace.critical_path[-1] == "d" and response.trace.critical_path[0] in ("a", "b")
    assert s["d"].critical and not s["c"].critical


async def test_when_skips_and_optional_failure_degrades(mesh) -> None:
    routing, _, _ = mesh({"p": {"nodes": {
        "a": node("fast"),
        "skipped": node("fast", when="1 > 2"),
        "flaky": node("fast", optional=True, params={"poison": True}),
        "out": node("fast", after=["a", "skipped", "flaky"], input=f"default(skipped.y, {VECTOR})")},
        "output": "out"}})
    async with routing as router:
        response = await run(router, "p")
    s = spans(response)
    assert s["skipped"].status == "skipped" and s["flaky"].status == "degraded" and s["out"].status == "ok"
    assert response.degraded and "poisoned" in s["flaky"].error


async def test_a_required_failure_is_a_component_error_naming_pipeline_and_node(mesh) -> None:
    routing, _, _ = mesh({"p": {"nodes": {"a": node("fast"), "b": node("fast", after=["a"], params={"poison": True})}}})
    async with routing as router:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await run(router, "p")
    err = component_error_of(info.value)
    assert err.code == grpc.StatusCode.INTERNAL
    assert (err.detail.pipeline, err.detail.node) == ("p", "b") and "node 'b'" in err.message


async def test_a_fallback_model_answers_when_the_primary_is_unavailable(mesh) -> None:
    routing, _, _ = mesh({"p": {"nodes": {"a": node("dead", fallback="other")}}})
    async with routing as router:
        response = await run(router, "p")
    s = spans(response)["a"]
    assert s.status == "fallback" and s.model_used == "other" and not response.degraded


async def test_the_deadline_budget_running_out_mid_pipeline_names_the_node(mesh) -> None:
    routing, _, _ = mesh({"p": {"nodes": {"a": node("slower"), "b": node("slower", after=["a"]),
                                          "c": node("slower", after=["b"])}}})
    async with routing as router:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await run(router, "p", timeout=0.4)            # ~150 ms a node: the budget ends in b or c
    err = component_error_of(info.value)
    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert err.detail is not None and err.detail.node in ("b", "c") and err.detail.pipeline == "p"


async def test_pipeline_id_and_latency_class_reach_the_model_server_and_every_node_is_metered_once(mesh) -> None:
    routing, meter, backend = mesh({"batchy": {"latency_class": "batch", "nodes": {
        "a": node("fast"), "b": node("other"), "c": node("fast", after=["a", "b"])}}})
    async with routing as router:
        response = await run(router, "batchy")
        await router.core.flush_metering()
    reg = backend.metrics.registry
    for model, calls in (("fast", 2), ("other", 1)):
        assert reg.get_sample_value("cmesh_model_pipeline_requests_total", {
            "model": model, "variant": "default", "pipeline": "batchy", "latency_class": "batch"}) == calls
    rows = await meter.rows()
    assert {(r.pipeline, r.model, r.latency_class) for r in rows} == {("batchy", "fast", "batch"),
                                                                      ("batchy", "other", "batch")}
    assert sum(r.requests for r in rows) == 3                 # one per node, each exactly once
    events = await meter.events(count=100)
    assert sorted(e.event.request_id for e in events) == ["req-1/a", "req-1/b", "req-1/c"]
    assert response.cost >= 0 and len(response.trace.nodes) == 3


async def test_pipeline_traces_are_exported_as_opentelemetry_spans(tmp_path) -> None:
    source = sleep_model(tmp_path, "fast", sleep_ms=5)
    async with running_server(mesh_config(tmp_path, {"fast": {"source": source}}), ["fast"]) as backend:
        cfg = mesh_config(tmp_path, {"fast": {"source": source, "endpoints": [f"127.0.0.1:{backend.port}"]}},
                          pipelines={"p": {"nodes": {"a": node("fast"), "b": node("fast"),
                                                     "c": node("fast", after=["a", "b"]),
                                                     "s": node("fast", when="false")}}},
                          observability={"tracing": "memory"})
        async with running_router(cfg) as router:
            response = await run(router, "p")
            spans = {s.name: s for s in router.spans.memory.get_finished_spans()}
    assert set(spans) == {"pipeline p", "node a", "node b", "node c"}     # skipped nodes make no span
    root = spans["pipeline p"]
    for name in ("node a", "node b", "node c"):
        assert spans[name].parent.span_id == root.context.span_id
        assert spans[name].attributes["cmesh.model"] == "fast"
    assert spans["node c"].attributes["cmesh.critical"] is True
    assert root.attributes["cmesh.request_id"] == "req-1" and response.trace.request_id == "req-1"
    assert spans["node c"].start_time >= max(spans["node a"].end_time, spans["node b"].end_time) - 1_000_000
