"""The router on real gRPC servers: forwarding (tritonclient too), the trust
layer, A/B variants, spill-over, priority, fast-path isolation, hold-and-release."""
import asyncio
import json
import sys
from collections import Counter

import grpc
import numpy as np
import pytest

from cmesh.client import AsyncClient
from meshtest import (REPO, identity_text_model, mesh_config, running_router, running_server, sleep_model)
from protos import mesh_pb2, mesh_pb2_grpc


def x(value: float) -> dict:
    return {"x": np.full((1, 4), value, dtype=np.float32)}


def text(*values: str) -> dict:
    return {"text": np.array([v.encode() for v in values], dtype=object)}


async def test_tritonclient_runs_model_infer_through_the_router(tmp_path) -> None:
    source = identity_text_model(tmp_path)
    backend_cfg = mesh_config(tmp_path, {"echo": {"source": source}})
    async with running_server(backend_cfg, ["echo"]) as backend:
        cfg = mesh_config(tmp_path, {"echo": {"source": source, "endpoints": [f"127.0.0.1:{backend.port}"]}})
        async with running_router(cfg) as router:
            out = tmp_path / "probe.json"
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(REPO / "tests" / "triton_probe.py"), f"127.0.0.1:{router.port}", "echo",
                "hello through the router", "--output", "echo", "--out", str(out))
            assert await proc.wait() == 0
    report = json.loads(out.read_text())
    assert report["live"] and report["ready"] and report["model_ready"]
    assert report["output"] == ["hello through the router"]
    assert report["metadata"]["inputs"][0]["name"] == "text"


async def test_the_model_server_receives_masked_text_and_an_audit_record_is_written(tmp_path) -> None:
    source = identity_text_model(tmp_path)
    async with running_server(mesh_config(tmp_path, {"echo": {"source": source}}), ["echo"]) as backend:
        cfg = mesh_config(tmp_path, {"echo": {"source": source, "endpoints": [f"127.0.0.1:{backend.port}"]}})
        async with running_router(cfg) as router:
            client = AsyncClient(f"127.0.0.1:{router.port}")
            secret = "mail jane.doe+vip@example.com or call +1 (415) 555-0132, card 4111 1111 1111 1111, order 1042"
            r = await client.infer("echo", text(secret, "nothing to hide"),
                                   parameters={"cmesh-request-id": "req-pii-1"})
            await client.close()
            echoed = [v.decode() for v in r.outputs["echo"]]
            assert echoed[1] == "nothing to hide"
            received = echoed[0]
            for raw in ("jane.doe", "example.com", "555-0132", "4111"):
                assert raw not in received
            assert "[EMAIL]" in received and "[PHONE]" in received and "[CARD]" in received
            assert "order 1042" in received
            record = next(r for r in router.audit.records if r["request_id"] == "req-pii-1")
            blob = json.dumps(record)
            # The exact values, not digit fragments: the record's timestamp has digits too.
            for raw in ("jane.doe", "example.com", "(415) 555-0132", "4111 1111 1111 1111"):
                assert raw not in blob
            assert record["masked"]["email"] == 1 and record["masked"]["card"] == 1
            assert router.metrics.value("cmesh_router_pii_masked_total", kind="email") >= 1


async def test_ab_variants_follow_weights_and_stick_to_sessions(tmp_path) -> None:
    a = identity_text_model(tmp_path, "echo", "1")
    b = identity_text_model(tmp_path, "echo", "2")
    variants = {"a": {"source": a, "weight": 75}, "b": {"source": b, "weight": 25}}
    async with running_server(mesh_config(tmp_path, {"echo": {"variants": variants}}), ["echo"]) as backend:
        cfg = mesh_config(tmp_path, {"echo": {"variants": variants, "endpoints": [f"127.0.0.1:{backend.port}"],
                                              "deployment": {"max_inflight_per_replica": 64}}})
        async with running_router(cfg) as router:
            addr = f"127.0.0.1:{router.port}"

            async def variant_for(session: str) -> str:
                c = AsyncClient(addr, metadata=[("cmesh-session", session)])
                try:
                    return (await c.infer("echo", text("hi"))).model_version
                finally:
                    await c.close()

            sessions = [f"user-{i}" for i in range(600)]
            first = await asyncio.gather(*(variant_for(s) for s in sessions))
            again = await asyncio.gather(*(variant_for(s) for s in sessions[:100]))
    share_a = Counter(first)["a"] / len(first)
    assert 0.68 <= share_a <= 0.82, share_a            # 75% +- ~4 standard deviations
    assert again == first[:100]                         # sticky per session


async def test_auto_mode_spills_to_serverless_past_the_capacity_threshold(tmp_path) -> None:
    source = sleep_model(tmp_path, sleep_ms=60, max_batch_size=1, max_queue_delay_ms=0)
    base = mesh_config(tmp_path, {"slow": {"source": source}})
    async with running_server(base, ["slow"]) as dedicated, running_server(base, ["slow"]) as serverless:
        cfg = mesh_config(tmp_path, {"slow": {
            "source": source,
            "deployment": {"mode": "auto", "dedicated_replicas": 1, "capacity_threshold": 0.5,
                           "max_inflight_per_replica": 4},
            "endpoints": {"dedicated": [f"127.0.0.1:{dedicated.port}"],
                          "serverless": [f"127.0.0.1:{serverless.port}"]}}})
        async with running_router(cfg) as router:
            client = AsyncClient(f"127.0.0.1:{router.port}")
            await client.infer("slow", x(0))           # light load: dedicated only
            assert router.metrics.value("cmesh_router_spillover_total", model="slow") == 0
            await asyncio.gather(*(client.infer("slow", x(i)) for i in range(8)))
            await client.close()
            spilled = router.metrics.value("cmesh_router_spillover_total", model="slow")
            to_dedicated = router.metrics.value("cmesh_router_dispatch_total", model="slow", pool="dedicated")
            to_serverless = router.metrics.value("cmesh_router_dispatch_total", model="slow", pool="serverless")
    assert spilled > 0 and to_serverless == spilled and to_dedicated >= 3


async def test_interactive_requests_overtake_a_flood_of_batch_requests(tmp_path) -> None:
    source = sleep_model(tmp_path, sleep_ms=20, max_batch_size=1, max_queue_delay_ms=0)
    async with running_server(mesh_config(tmp_path, {"slow": {"source": source}}), ["slow"]) as backend:
        cfg = mesh_config(tmp_path, {"slow": {"source": source, "endpoints": [f"127.0.0.1:{backend.port}"],
                                              "deployment": {"max_inflight_per_replica": 1}}})
        async with running_router(cfg) as router:
            finished: list[str] = []

            async def call(kind: str, i: int) -> None:
                c = AsyncClient(f"127.0.0.1:{router.port}", metadata=[("cmesh-latency-class", kind)])
                await c.infer("slow", x(i))
                finished.append(kind)
                await c.close()

            batch = [asyncio.create_task(call("batch", i)) for i in range(30)]
            while router.metrics.value("cmesh_router_queue_depth", model="slow", latency_class="batch") < 25:
                await asyncio.sleep(0.005)
            interactive = [asyncio.create_task(call("interactive", i)) for i in range(5)]
            await asyncio.gather(*batch, *interactive)
    last_interactive = max(i for i, kind in enumerate(finished) if kind == "interactive")
    # All five interactive requests were answered while most of the earlier batch flood still waited.
    assert last_interactive < 12, finished


async def test_a_saturated_slow_model_does_not_delay_a_fast_one(tmp_path) -> None:
    slow = sleep_model(tmp_path, "slow", sleep_ms=100, max_batch_size=1, max_queue_delay_ms=0)
    fast = sleep_model(tmp_path, "fast", sleep_ms=1, max_batch_size=8, max_queue_delay_ms=0)
    base = mesh_config(tmp_path, {"slow": {"source": slow}, "fast": {"source": fast}})
    async with running_server(base, ["slow", "fast"]) as backend:
        ep = [f"127.0.0.1:{backend.port}"]
        cfg = mesh_config(tmp_path, {"slow": {"source": slow, "endpoints": ep,
                                              "deployment": {"max_inflight_per_replica": 1}},
                                     "fast": {"source": fast, "endpoints": ep}})
        async with running_router(cfg) as router:
            client = AsyncClient(f"127.0.0.1:{router.port}")
            slow_done: list[int] = []

            async def slow_call(i: int) -> None:
                await client.infer("slow", x(i))
                slow_done.append(i)

            flood = [asyncio.create_task(slow_call(i)) for i in range(20)]
            await asyncio.sleep(0.05)
            for i in range(20):
                await client.infer("fast", x(i))
            slow_finished_during_fast = len(slow_done)
            await asyncio.gather(*flood)
            await client.close()
    # 20 fast calls completed while at most a few of the queued slow calls did.
    assert slow_finished_during_fast <= 5, slow_finished_during_fast


class FakeAutoscaler(mesh_pb2_grpc.AutoscalerServicer):
    """Real gRPC, fake policy: a warm-up request 'starts' a replica that already runs."""

    def __init__(self, model: str, address: str) -> None:
        self.model, self.address = model, address
        self.warmed: list[str] = []
        self.tables: asyncio.Queue = asyncio.Queue()
        self.tables.put_nowait(mesh_pb2.EndpointTable(version=1))          # starts with zero replicas

    async def WatchEndpoints(self, request, context):
        while True:
            yield await self.tables.get()

    async def Warm(self, request, context):
        self.warmed.append(request.model)
        table = mesh_pb2.EndpointTable(version=2)
        table.models.add(model=self.model).replicas.add(id="r1", address=self.address, pool="serverless",
                                                       state="ready")
        await asyncio.sleep(0.3)           # a cold start takes a while
        self.tables.put_nowait(table)
        return mesh_pb2.WarmResponse(models=[request.model])


async def test_requests_are_held_while_a_model_has_no_replica_and_released_when_one_is_ready(tmp_path) -> None:
    source = sleep_model(tmp_path, sleep_ms=1)
    async with running_server(mesh_config(tmp_path, {"m": {"source": source}}), ["m"]) as backend:
        fake = FakeAutoscaler("m", f"127.0.0.1:{backend.port}")
        server = grpc.aio.server()
        mesh_pb2_grpc.add_AutoscalerServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        cfg = mesh_config(tmp_path, {"m": {"source": source}}, router={"autoscaler": f"127.0.0.1:{port}"})
        async with running_router(cfg) as router:
            client = AsyncClient(f"127.0.0.1:{router.port}")
            results = await asyncio.gather(*(client.infer("m", x(i), timeout=20) for i in range(5)))
            await client.close()
            assert [r.outputs["y"][0, 0] for r in results] == [0, 1, 2, 3, 4]
            assert fake.warmed == ["m"]            # asked once, not once per held request
            assert router.metrics.value("cmesh_router_cold_start_waits_total", model="m") == 1
        await server.stop(0)


async def test_a_held_request_fails_at_its_deadline_with_unavailable_and_a_component_error(tmp_path) -> None:
    from cmesh.errors import component_error_of

    source = sleep_model(tmp_path, sleep_ms=1)
    cfg = mesh_config(tmp_path, {"m": {"source": source}})        # static, and no endpoints at all
    async with running_router(cfg) as router:
        client = AsyncClient(f"127.0.0.1:{router.port}")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.infer("m", x(1), timeout=0.3)
        await client.close()
    err = component_error_of(info.value)
    assert err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    if err.code == grpc.StatusCode.UNAVAILABLE:         # the router answered just before the client gave up
        assert err.detail.component == "m" and err.detail.reason == "no_replica"


async def test_held_request_with_a_router_side_timeout_gets_unavailable(tmp_path) -> None:
    from cmesh.errors import component_error_of

    source = sleep_model(tmp_path, sleep_ms=1)
    cfg = mesh_config(tmp_path, {"m": {"source": source}}, router={"hold_timeout_s": 0.2})
    async with running_router(cfg) as router:
        client = AsyncClient(f"127.0.0.1:{router.port}")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.infer("m", x(1), timeout=10)
        await client.close()
    err = component_error_of(info.value)
    assert err.code == grpc.StatusCode.UNAVAILABLE
    assert err.detail.component == "m" and err.detail.reason == "no_replica" and err.detail.retryable


async def test_a_full_queue_sheds_batch_before_interactive_with_retry_after(tmp_path) -> None:
    from cmesh.errors import component_error_of

    source = sleep_model(tmp_path, sleep_ms=50, max_batch_size=1, max_queue_delay_ms=0)
    async with running_server(mesh_config(tmp_path, {"slow": {"source": source}}), ["slow"]) as backend:
        cfg = mesh_config(tmp_path, {"slow": {"source": source, "endpoints": [f"127.0.0.1:{backend.port}"],
                                              "deployment": {"max_inflight_per_replica": 1}}},
                          router={"max_queue_per_model": 4})
        async with running_router(cfg) as router:
            def client(kind: str) -> AsyncClient:
                return AsyncClient(f"127.0.0.1:{router.port}", metadata=[("cmesh-latency-class", kind)])

            batch_client, interactive_client = client("batch"), client("interactive")
            batch = [asyncio.create_task(batch_client.infer("slow", x(i))) for i in range(5)]   # 1 runs, 4 queue
            while router.metrics.value("cmesh_router_queue_depth", model="slow", latency_class="batch") < 4:
                await asyncio.sleep(0.005)
            interactive = [asyncio.create_task(interactive_client.infer("slow", x(i))) for i in range(3)]
            results = await asyncio.gather(*batch, *interactive, return_exceptions=True)
            await batch_client.close()
            await interactive_client.close()
            assert router.metrics.value("cmesh_router_shed_total", model="slow", latency_class="batch") == 3
    assert all(not isinstance(r, Exception) for r in results[5:])          # every interactive request served
    shed = [r for r in results[:5] if isinstance(r, grpc.aio.AioRpcError)]
    assert len(shed) == 3
    for err in shed:
        detail = component_error_of(err)
        assert detail.code == grpc.StatusCode.RESOURCE_EXHAUSTED and detail.detail.retry_after_ms > 0
