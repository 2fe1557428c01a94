"""Admin.CostReport over a real grpc.aio server, and `cmesh cost` against it and
against Redis."""
import asyncio
import json
import os
import sys

import grpc
import pytest
import redis.asyncio as aredis

from cmesh.cli import main
from cmesh.config import parse_config
from cmesh.cost import build_report, report_from_proto, to_json
from cmesh.errors import component_error_of
from meshtest import REPO, free_port, write_config
from protos import mesh_pb2, mesh_pb2_grpc
from router.admin import AdminServicer
from router.metering import MemoryMeter, MeterEvent, RedisMeter

ADMIN_KEY = "test-admin-key"
CONFIG_DATA = {"models": {
    "embedder": {"source": "store://minilm-l6/1", "price": {"replica_second": 0.001}},
    "llm": {"variants": {"a": {"source": "store://tiny-llm/1"}, "b": {"source": "store://tiny-llm/2"}},
            "price": {"replica_second": 0.01, "per_1k_tokens": 0.5}}}}
CONFIG = parse_config(CONFIG_DATA)


def events() -> list[MeterEvent]:
    spec = [("acme", "support", "embedder", "default", "OK", 20, 0, 0.5),
            ("acme", "support", "llm", "a", "OK", 300, 120, 2.0),
            ("acme", "support", "llm", "b", "UNAVAILABLE", 40, 0, 0.0),
            ("globex", "", "embedder", "default", "OK", 5, 0, 0.1),
            ("globex", "", "ghost", "default", "OK", 1, 1, 3.0)]
    out = []
    for i in range(30):
        tenant, pipeline, model, variant, status, tin, tout, compute = spec[i % len(spec)]
        out.append(MeterEvent(request_id=f"r{i}", tenant=tenant, pipeline=pipeline, model=model,
                              variant=variant, latency_class="interactive", status=status,
                              input_tokens=tin, output_tokens=tout, compute_s=compute,
                              timestamp=1_700_000_000.0 + i))
    return out


class RequireAdminKey(grpc.aio.ServerInterceptor):
    """Stands in for the router's auth layer, so the CLI's key is really checked."""

    async def intercept_service(self, continuation, details):
        if dict(details.invocation_metadata).get("authorization") == f"Bearer {ADMIN_KEY}":
            return await continuation(details)

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: admin key required")

        return grpc.unary_unary_rpc_method_handler(deny)


async def start_admin(servicer: AdminServicer, *, auth: bool = True):
    server = grpc.aio.server(interceptors=[RequireAdminKey()] if auth else [])
    mesh_pb2_grpc.add_AdminServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
async def admin():
    meter = MemoryMeter()
    for e in events():
        await meter.record(e)
    server, address = await start_admin(AdminServicer(meter, CONFIG))
    yield address, meter
    await server.stop(grace=None)


METADATA = [("authorization", f"Bearer {ADMIN_KEY}")]


async def call(address: str, group_by: str, metadata=METADATA) -> mesh_pb2.CostReportResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        return await mesh_pb2_grpc.AdminStub(channel).CostReport(
            mesh_pb2.CostReportRequest(group_by=group_by), metadata=metadata, timeout=10)


async def test_cost_report_over_grpc(admin) -> None:
    address, meter = admin
    rows = await meter.rows()
    for group_by in ("pipeline", "tenant", "model", "variant"):
        response = await call(address, group_by)
        assert report_from_proto(response) == build_report(rows, CONFIG, group_by)
    variant = await call(address, "variant")
    keys = {r.key: r for r in variant.rows}
    assert set(keys) == {"embedder:default", "llm:a", "llm:b", "ghost:default"}
    assert (keys["llm:b"].requests, keys["llm:b"].errors) == (6, 6)
    assert keys["llm:a"].cost == pytest.approx(6 * 2.0 * 0.01 + 6 * 420 / 1000 * 0.5)
    assert keys["ghost:default"].cost == 0 and keys["ghost:default"].compute_s == pytest.approx(18.0)
    # An unset group_by is the default grouping, by pipeline.
    assert {r.key for r in (await call(address, "")).rows} == {"support", "(none)"}


async def test_bad_group_by_is_invalid_argument_naming_the_field(admin) -> None:
    address, _ = admin
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(address, "region")
    err = component_error_of(info.value)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.message.startswith("group_by:") and "'region'" in err.message
    assert err.detail is not None and err.detail.field == "group_by"


async def test_unreachable_meter_store_is_unavailable() -> None:
    meter = RedisMeter(f"redis://127.0.0.1:{free_port()}/0", timeout_s=2)
    server, address = await start_admin(AdminServicer(meter, CONFIG), auth=False)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(address, "model")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "Redis at redis://127.0.0.1" in info.value.details()
    finally:
        await server.stop(grace=None)
        await meter.close()


async def test_prices_follow_a_reloaded_config() -> None:
    meter = MemoryMeter()
    for e in events():
        await meter.record(e)
    current = {"config": CONFIG}
    server, address = await start_admin(AdminServicer(meter, lambda: current["config"]), auth=False)
    try:
        before = (await call(address, "model")).total_cost
        current["config"] = parse_config({"models": {"embedder": {"source": "x"}}})   # all free now
        after = (await call(address, "model")).total_cost
        assert before > 0 and after == 0
    finally:
        await server.stop(grace=None)


async def test_cli_cost_router_json_subprocess(admin) -> None:
    address, meter = admin
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["CMESH_ADMIN_KEY"] = ADMIN_KEY                       # the key from the environment
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cmesh.cli", "cost", "--router", address, "--json", "--by", "variant",
        cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, err.decode()
    assert json.loads(out) == to_json(build_report(await meter.rows(), CONFIG, "variant"))


async def test_cli_cost_router_table_and_errors(admin, capsys, monkeypatch) -> None:
    address, _ = admin
    monkeypatch.delenv("CMESH_ADMIN_KEY", raising=False)
    code = await asyncio.to_thread(main, ["cost", "--router", address, "--by", "tenant",
                                          "--admin-key", ADMIN_KEY])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].split()[0] == "tenant" and out[-1].split()[:2] == ["total", "30"]
    assert {line.split()[0] for line in out[1:-2]} == {"acme", "globex"}

    code = await asyncio.to_thread(main, ["cost", "--router", address])          # no key
    err = capsys.readouterr().err
    assert code == 1 and "UNAUTHENTICATED" in err and "--admin-key" in err

    dead = f"127.0.0.1:{free_port()}"
    code = await asyncio.to_thread(main, ["cost", "--router", dead, "--admin-key", "k", "--timeout", "5"])
    err = capsys.readouterr().err
    assert code == 1 and dead in err and "UNAVAILABLE" in err and "--redis" in err


async def test_cli_cost_reads_redis_directly(redis_url, tmp_path, capsys) -> None:
    # A database of its own, so the default key prefix collides with no other test.
    url = redis_url.rsplit("/", 1)[0] + "/9"
    client = aredis.from_url(url)
    await client.flushdb()
    await client.aclose()
    meter = RedisMeter(url)
    for e in events():
        await meter.record(e)
    rows = await meter.rows()
    await meter.close()
    config_path = write_config(tmp_path / "mesh.yaml", CONFIG_DATA)
    code = await asyncio.to_thread(main, ["cost", "--redis", url, "--config", str(config_path),
                                          "--by", "model", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    assert json.loads(out) == to_json(build_report(rows, CONFIG, "model"))

    dead = f"redis://127.0.0.1:{free_port()}/0"
    code = await asyncio.to_thread(main, ["cost", "--redis", dead, "--config", str(config_path),
                                          "--timeout", "2"])
    err = capsys.readouterr().err
    assert code == 1 and "cannot reach Redis at" in err and dead in err
