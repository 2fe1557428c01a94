"""Failure handling through the router on real servers: the breaker's cycle,
retries (never after a response started, never past the budget), and a replica
SIGKILLed under 2,000 concurrent requests."""
import asyncio
import signal

import grpc
import numpy as np
import pytest

from cmesh.client import AsyncClient, build_request
from cmesh.errors import component_error_of
from meshtest import (ServerProcess, free_port, in_flight_address, mesh_config, running_router, running_server,
                      sleep_model, write_config)
from router.metering import RedisMeter


def x(value: float) -> dict:
    return {"x": np.full((1, 4), value, dtype=np.float32)}


async def test_breaker_opens_answers_with_component_error_half_opens_and_closes(tmp_path) -> None:
    source = sleep_model(tmp_path, sleep_ms=1, max_batch_size=1, max_queue_delay_ms=0)
    async with running_server(mesh_config(tmp_path, {"m": {"source": source}}), ["m"]) as backend:
        cfg = mesh_config(tmp_path, {"m": {"source": source, "endpoints": [f"127.0.0.1:{backend.port}"]}},
                          router={"breaker": {"failure_threshold": 3, "cool_down_s": 0.3}})
        async with running_router(cfg) as router:
            client = AsyncClient(f"127.0.0.1:{router.port}")
            for i in range(3):                      # the replica fails these (INTERNAL)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await client.infer("m", x(i), parameters={"poison": True})
                assert info.value.code() == grpc.StatusCode.INTERNAL
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.infer("m", x(9))       # a good request, refused at once while open
            err = component_error_of(info.value)
            assert err.code == grpc.StatusCode.UNAVAILABLE
            assert (err.detail.component, err.detail.reason, err.detail.retryable) == ("m:default", "breaker_open", True)
            assert 0 < err.detail.retry_after_ms <= 300
            assert router.metrics.value("cmesh_router_breaker_state", component="m:default") == 2
            await asyncio.sleep(0.35)               # cool-down over: half-open, one probe
            with pytest.raises(grpc.aio.AioRpcError):
                await client.infer("m", x(1), parameters={"poison": True})     # the probe fails: open again
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.infer("m", x(2))
            assert component_error_of(info.value).detail.reason == "breaker_open"
            await asyncio.sleep(0.35)
            assert (await client.infer("m", x(5))).outputs["y"][0, 0] == 5.0   # probe succeeds: closed
            assert router.metrics.value("cmesh_router_breaker_state", component="m:default") == 0
            assert (await client.infer("m", x(6))).outputs["y"][0, 0] == 6.0
            await client.close()


async def test_no_retry_once_a_streamed_response_has_started(demo_store, tmp_path) -> None:
    cfg_path = write_config(tmp_path / "mesh.yaml", {"store": str(demo_store), "models": {
        "llm": {"source": "store://tiny-llm/1", "engine": "hf-causal-lm"}}})
    first, second = ServerProcess(cfg_path, ["llm"]), ServerProcess(cfg_path, ["llm"])
    try:
        cfg = mesh_config(demo_store, {"llm": {"source": "store://tiny-llm/1",
                                               "endpoints": [first.address, second.address]}})
        async with running_router(cfg) as router:
            client = AsyncClient(f"127.0.0.1:{router.port}")
            request = build_request("llm", {"text_input": np.array([b"Customer: hello\nAgent:"], dtype=object)},
                                    parameters={"max_tokens": 250, "temperature": 0.9, "seed": 1})
            got_tokens, error = 0, ""
            async for response in client.stream([request], timeout=60):
                if response.error_message:
                    error = response.error_message
                    break
                got_tokens += 1
                if got_tokens == 1:
                    victim = first if in_flight_address(router.core, "llm") == first.address else second
                    victim.proc.send_signal(signal.SIGKILL)
            await client.close()
            assert got_tokens >= 1 and error.startswith("UNAVAILABLE"), (got_tokens, error)
            assert router.metrics.value("cmesh_router_retries_total", model="llm", code="UNAVAILABLE") == 0
            assert router.metrics.value("cmesh_router_retries_denied_total", model="llm",
                                        reason="response_started") == 1
            survivor = second if victim is first else first
            with pytest.raises(KeyError):             # the other replica never saw the request
                survivor.metric("cmesh_model_requests_total", model="llm")
    finally:
        first.stop(timeout=10)
        second.stop(timeout=10)


async def test_retries_never_exceed_the_budget(tmp_path) -> None:
    source = sleep_model(tmp_path, sleep_ms=1, max_batch_size=1, max_queue_delay_ms=0)
    dead = f"127.0.0.1:{free_port()}"                # nothing listens there
    async with running_server(mesh_config(tmp_path, {"m": {"source": source}}), ["m"]) as live:
        cfg = mesh_config(tmp_path, {"m": {"source": source, "deployment": {"max_inflight_per_replica": 1},
                                           "endpoints": [dead, f"127.0.0.1:{live.port}"]}},
                          router={"retry": {"budget_ratio": 0.2, "min_retries_per_s": 0, "backoff_ms": 0},
                                  "outlier": {"consecutive_failures": 1_000_000}})
        async with running_router(cfg) as router:
            client = AsyncClient(f"127.0.0.1:{router.port}")
            n = 100
            outcomes = []
            for i in range(0, n, 2):               # pairs: one lands on each replica
                outcomes += await asyncio.gather(client.infer("m", x(i)), client.infer("m", x(i + 1)),
                                                 return_exceptions=True)
            await client.close()
            retries = router.metrics.value("cmesh_router_retries_total", model="m", code="UNAVAILABLE")
            denied = router.metrics.value("cmesh_router_retries_denied_total", model="m", reason="budget")
    failures = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert all(f.code() == grpc.StatusCode.UNAVAILABLE for f in failures)
    assert 0 < retries <= 0.2 * n                 # retried on the live replica, within budget
    assert denied == len(failures) > 0            # the rest were refused a retry, not retried


async def test_replica_killed_under_2000_concurrent_requests_loses_nothing_and_meters_once(
        tmp_path, redis_url) -> None:
    source = sleep_model(tmp_path, sleep_ms=2, max_batch_size=16, max_queue_delay_ms=1)
    cfg_path = write_config(tmp_path / "backend.yaml", {"store": str(tmp_path), "models": {"m": {"source": source}}})
    replicas = [ServerProcess(cfg_path, ["m"]), ServerProcess(cfg_path, ["m"])]
    meter = RedisMeter(redis_url, prefix="cmesh:test:fault")
    try:
        cfg = mesh_config(tmp_path, {"m": {"source": source, "endpoints": [r.address for r in replicas]}})
        async with running_router(cfg, meter=meter) as router:
            client = AsyncClient(f"127.0.0.1:{router.port}")
            total, done = 2000, 0
            gate = asyncio.Semaphore(128)

            async def one(i: int):
                nonlocal done
                async with gate:
                    r = await client.infer("m", x(i), parameters={"cmesh-request-id": f"fault-{i}"}, timeout=60)
                done += 1
                if done == total // 3:
                    replicas[0].proc.send_signal(signal.SIGKILL)
                return r.outputs["y"][0, 0]

            results = await asyncio.gather(*(one(i) for i in range(total)), return_exceptions=True)
            await client.close()
            await router.core.flush_metering()
            errors = [r for r in results if isinstance(r, BaseException)]
            assert not errors, errors[:3]
            assert [float(v) for v in results] == [float(i) for i in range(total)]
            retried = router.metrics.value("cmesh_router_retries_total", model="m", code="UNAVAILABLE")
            assert retried > 0                      # the kill really hit in-flight requests
            rows = await meter.rows()
            assert sum(r.requests for r in rows) == total
            events = await meter.events(count=10 * total)
            ids = [e.event.request_id for e in events]
            assert len(ids) == total and len(set(ids)) == total
    finally:
        await meter.close()
        for r in replicas:
            r.stop(timeout=10)
