"""Auth, rate limits, admin-only operations, mutual TLS, and exact metering
(Redis and in-process) through the router on real servers."""
import asyncio

import grpc
import numpy as np
import pytest

from cmesh.client import AsyncClient
from cmesh.config import TLSConfig
from cmesh.cost import build_report, to_json
from cmesh.errors import component_error_of
from meshtest import free_port, mesh_config, running_router, running_server, sleep_model
from protos import mesh_pb2, mesh_pb2_grpc
from router.auth import Authenticator
from router.metering import MemoryMeter, RedisMeter

ENV = {"KEYS_ACME": "acme-key-1,acme-key-2", "KEYS_GLOBEX": "globex-key", "ADMIN_KEYS": "root-key"}


def x(value: float) -> dict:
    return {"x": np.full((1, 4), value, dtype=np.float32)}


def secured_config(tmp_path, source: str, port: int, **extra):
    return mesh_config(tmp_path, {
        "m": {"source": source, "endpoints": [f"127.0.0.1:{port}"]},
        "acme-only": {"source": source, "endpoints": [f"127.0.0.1:{port}"], "tenants": ["acme"]}},
        tenants={"acme": {"api_keys_env": "KEYS_ACME", "rate_per_s": 5, "burst": 5},
                 "globex": {"api_keys_env": "KEYS_GLOBEX", "rate_per_s": 1000}},
        security={"admin_keys_env": "ADMIN_KEYS", **extra.pop("security", {})}, **extra)


async def expect(call, code: grpc.StatusCode) -> object:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value
    return component_error_of(info.value)


async def test_api_keys_tenants_rate_limits_and_admin(tmp_path) -> None:
    source = sleep_model(tmp_path, sleep_ms=1)
    both = mesh_config(tmp_path, {"m": {"source": source}, "acme-only": {"source": source}})
    async with running_server(both, ["m", "acme-only"]) as backend:
        cfg = secured_config(tmp_path, source, backend.port)
        async with running_router(cfg, auth=Authenticator.from_env(cfg, ENV)) as router:
            addr = f"127.0.0.1:{router.port}"

            def as_key(key: str | None, *extra) -> AsyncClient:
                md = [("authorization", f"Bearer {key}")] if key else []
                return AsyncClient(addr, metadata=md + list(extra))

            anonymous, stranger = as_key(None), as_key("no-such-key")
            acme, globex, admin = as_key("acme-key-2"), as_key("globex-key"), as_key("root-key")
            err = await expect(anonymous.infer("m", x(1)), grpc.StatusCode.UNAUTHENTICATED)
            assert "Bearer" in err.message
            await expect(stranger.infer("m", x(1)), grpc.StatusCode.UNAUTHENTICATED)
            assert (await globex.infer("m", x(1))).outputs["y"][0, 0] == 1.0
            await expect(globex.infer("acme-only", x(1)), grpc.StatusCode.PERMISSION_DENIED)
            impostor = as_key("globex-key", ("cmesh-tenant", "acme"))
            await expect(impostor.infer("m", x(1)), grpc.StatusCode.PERMISSION_DENIED)

            statuses = await asyncio.gather(*(acme.infer("acme-only", x(i)) for i in range(8)),
                                            return_exceptions=True)
            limited = [s for s in statuses if isinstance(s, grpc.aio.AioRpcError)]
            assert 1 <= len(limited) <= 3 and sum(not isinstance(s, Exception) for s in statuses) >= 5
            assert all(s.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for s in limited)
            assert component_error_of(limited[0]).detail.retry_after_ms > 0
            assert component_error_of(limited[0]).detail.reason == "rate_limited"

            stub_for = lambda c: mesh_pb2_grpc.AdminStub(c.channel)  # noqa: E731
            await expect(stub_for(acme).CostReport(mesh_pb2.CostReportRequest(group_by="tenant"),
                                                   metadata=acme.metadata), grpc.StatusCode.PERMISSION_DENIED)
            await router.core.flush_metering()
            report = await stub_for(admin).CostReport(mesh_pb2.CostReportRequest(group_by="tenant"),
                                                      metadata=admin.metadata)
            by_tenant = {row.key: row for row in report.rows}
            # Metering counts what entered the mesh; refusals at the front door are metrics only.
            admitted = sum(not isinstance(s, Exception) for s in statuses)
            assert by_tenant["globex"].requests == 1 and by_tenant["acme"].requests == admitted
            for c in (anonymous, stranger, acme, globex, admin, impostor):
                await c.close()


async def test_mutual_tls_on_the_router_accepts_trusted_clients_only(tmp_path, pki) -> None:
    source = sleep_model(tmp_path, sleep_ms=1)
    async with running_server(mesh_config(tmp_path, {"m": {"source": source}}), ["m"]) as backend:
        server_tls = {"cert": str(pki.server_cert), "key": str(pki.server_key), "ca": str(pki.ca),
                      "client_auth": True}
        cfg = mesh_config(tmp_path, {"m": {"source": source, "endpoints": [f"127.0.0.1:{backend.port}"]}},
                          security={"server_tls": server_tls})
        async with running_router(cfg) as router:
            addr = f"localhost:{router.port}"
            trusted = AsyncClient(addr, tls=TLSConfig(ca=str(pki.ca), cert=str(pki.client_cert),
                                                      key=str(pki.client_key)))
            assert (await trusted.infer("m", x(3), timeout=10)).outputs["y"][0, 0] == 3.0
            rogue = AsyncClient(addr, tls=TLSConfig(ca=str(pki.ca), cert=str(pki.rogue_cert),
                                                    key=str(pki.rogue_key)))
            no_cert = AsyncClient(addr, tls=TLSConfig(ca=str(pki.ca)))
            plain = AsyncClient(addr)
            for client in (rogue, no_cert, plain):
                await expect(client.infer("m", x(1), timeout=10), grpc.StatusCode.UNAVAILABLE)
            for client in (trusted, rogue, no_cert, plain):
                await client.close()


async def run_metered_traffic(tmp_path, meter, live_port: int, dead: str) -> list:
    source = sleep_model(tmp_path, sleep_ms=1)
    cfg = mesh_config(tmp_path, {"m": {"source": source, "endpoints": [dead, f"127.0.0.1:{live_port}"],
                                       "deployment": {"max_inflight_per_replica": 1}}},
                      router={"retry": {"backoff_ms": 0}})
    async with running_router(cfg, meter=meter) as router:
        client = AsyncClient(f"127.0.0.1:{router.port}", metadata=[("cmesh-pipeline-id", "support-agent")])
        def call(i: int):
            return client.infer("m", x(i), parameters={"cmesh-request-id": f"req-{i}"})

        for i in range(0, 40, 2):                    # pairs, so the dead replica gets its share
            await asyncio.gather(call(i), call(i + 1))
        for i in range(0, 10, 2):                    # a client retrying the same request ids
            await asyncio.gather(call(i), call(i + 1))
        await client.close()
        await router.core.flush_metering()
        retried = router.metrics.value("cmesh_router_retries_total", model="m", code="UNAVAILABLE")
    return await meter.rows(), retried, cfg


async def test_metering_is_exact_under_retries_with_redis_and_the_same_in_process(tmp_path, redis_url) -> None:
    source = sleep_model(tmp_path, sleep_ms=1)
    dead = f"127.0.0.1:{free_port()}"
    async with running_server(mesh_config(tmp_path, {"m": {"source": source}}), ["m"]) as live:
        redis_meter = RedisMeter(redis_url, prefix="cmesh:test:exact")
        redis_rows, redis_retried, cfg = await run_metered_traffic(tmp_path, redis_meter, live.port, dead)
        events = await redis_meter.events(count=1000)
        await redis_meter.close()
        memory_rows, _, _ = await run_metered_traffic(tmp_path, MemoryMeter(), live.port, dead)
    assert redis_retried > 0                          # attempts really were retried
    assert sum(r.requests for r in redis_rows) == 40 and len(events) == 40
    assert {r.key() for r in redis_rows} == {("anonymous", "support-agent", "m", "default", "interactive", "OK")}

    def counts(rows, group_by):
        return [{k: v for k, v in line.items() if k not in ("compute_s", "cost")}
                for line in to_json(build_report(rows, cfg, group_by))["rows"]]

    for group_by in ("pipeline", "tenant", "model", "variant"):
        assert counts(redis_rows, group_by) == counts(memory_rows, group_by)
