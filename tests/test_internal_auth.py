"""Internal ports (DESIGN.md §2): replicas and the autoscaler admit only mesh callers,
by the mesh-internal token or a verified client certificate; repository load/unload
is off unless the config enables it. Real gRPC servers on loopback."""
import asyncio
import logging
import os
import subprocess
import sys
from contextlib import asynccontextmanager

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from autoscaler.controller import Controller
from autoscaler.service import AutoscalerServicer
from cmesh.client import AsyncClient, build_request
from cmesh.config import TLSConfig
from cmesh.errors import component_error_of
from cmesh.internal_auth import HEADER, MeshCredentials, open_internal_channel, server_interceptors, token_from_env
from cmesh.serving import grpc_server
from cmesh.validation import ConfigError
from meshtest import IdleProvider, REPO, mesh_config, running_router, running_server, sleep_model, write_config
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from protos import mesh_pb2, mesh_pb2_grpc

TOKEN = "t0ken-for-the-mesh-internal-ports"
SECURED = {"security": {"internal_token_env": "CMESH_TEST_INTERNAL_TOKEN"}}


def x(value: float) -> dict:
    return {"x": np.full((1, 4), value, dtype=np.float32)}


def meta(token: str | None) -> tuple:
    return ((HEADER, token),) if token else ()


async def code_of(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


# ---------------------------------------------------------------- replicas

@pytest.fixture()
def replica_config(tmp_path):
    return mesh_config(tmp_path, {"m": {"source": sleep_model(tmp_path, sleep_ms=1)}}, **SECURED)


async def test_every_replica_rpc_needs_the_token_except_health(replica_config) -> None:
    async with running_server(replica_config, ["m"], internal_token=TOKEN) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            infer = build_request("m", x(1.0))
            calls = {
                "ServerLive": lambda md: stub.ServerLive(pb.ServerLiveRequest(), metadata=md, timeout=5),
                "ServerReady": lambda md: stub.ServerReady(pb.ServerReadyRequest(), metadata=md, timeout=5),
                "ModelReady": lambda md: stub.ModelReady(pb.ModelReadyRequest(name="m"), metadata=md, timeout=5),
                "ModelMetadata": lambda md: stub.ModelMetadata(pb.ModelMetadataRequest(name="m"), metadata=md,
                                                               timeout=5),
                "ModelInfer": lambda md: stub.ModelInfer(infer, metadata=md, timeout=5),
                "RepositoryIndex": lambda md: stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=md,
                                                                   timeout=5),
                "RepositoryModelUnload": lambda md: stub.RepositoryModelUnload(
                    pb.RepositoryModelUnloadRequest(model_name="m"), metadata=md, timeout=5),
            }
            for name, call in calls.items():
                assert await code_of(call(())) == grpc.StatusCode.UNAUTHENTICATED, name
                assert await code_of(call(meta("wrong-token-of-the-same-size!!"))) == \
                    grpc.StatusCode.UNAUTHENTICATED, name
            try:
                await stub.ModelInfer(infer, timeout=5)
            except grpc.aio.AioRpcError as exc:
                err = component_error_of(exc)
                assert HEADER in err.message and err.detail.reason == "unauthenticated"
            # The bidi stream too: refused before any request is answered.
            stream = stub.ModelStreamInfer(iter([infer]), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in stream:
                    pass
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # With the token everything answers; the model is still there.
            assert (await stub.ModelReady(pb.ModelReadyRequest(name="m"), metadata=meta(TOKEN), timeout=5)).ready
            out = await stub.ModelInfer(infer, metadata=meta(TOKEN), timeout=5)
            assert out.model_name == "m"
            # grpc.health.v1 stays open: kubelet gRPC probes send no metadata.
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_token_channel_reaches_the_replica_on_every_kind_of_call(replica_config) -> None:
    async with running_server(replica_config, ["m"], internal_token=TOKEN) as server:
        async with open_internal_channel(f"127.0.0.1:{server.port}", MeshCredentials(token=TOKEN)) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert (await stub.ServerReady(pb.ServerReadyRequest(), timeout=5)).ready           # unary
            caller_md = grpc.aio.Metadata(("cmesh-session", "s1"))
            await stub.ModelInfer(build_request("m", x(2.0)), metadata=caller_md, timeout=5)
            assert list(caller_md) == [("cmesh-session", "s1")]          # the caller's metadata is not changed
            answers = [r async for r in stub.ModelStreamInfer(iter([build_request("m", x(3.0))]), timeout=5)]
            assert len(answers) == 1 and not answers[0].error_message                         # stream-stream


async def test_repository_load_and_unload_are_off_unless_the_config_enables_them(tmp_path) -> None:
    source = sleep_model(tmp_path, sleep_ms=1)
    off = mesh_config(tmp_path, {"m": {"source": source}})
    async with running_server(off, ["m"]) as server:
        client = AsyncClient(f"127.0.0.1:{server.port}")
        for call in (client.stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="m"), timeout=5),
                     client.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="m"), timeout=5)):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            err = component_error_of(info.value)
            assert err.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "server.model_control: explicit" in err.message and not err.detail.retryable
        assert (await client.stub.ModelReady(pb.ModelReadyRequest(name="m"), timeout=5)).ready   # still serving
        index = await client.stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5)
        assert [(m.name, m.state) for m in index.models] == [("m", "READY")]
        await client.close()
    explicit = mesh_config(tmp_path, {"m": {"source": source}}, server={"model_control": "explicit"})
    async with running_server(explicit, ["m"]) as server:
        client = AsyncClient(f"127.0.0.1:{server.port}")
        await client.stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="m"), timeout=5)
        assert not (await client.stub.ModelReady(pb.ModelReadyRequest(name="m"), timeout=5)).ready
        await client.close()


async def test_open_internal_ports_warn_once_at_start(replica_config, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="cmesh.internal_auth"):
        async with running_server(replica_config, ["m"]):
            pass
    warnings = [r for r in caplog.records if "UNAUTHENTICATED" in r.getMessage()]
    assert len(warnings) == 1 and "model server" in warnings[0].getMessage()


async def test_with_mutual_tls_a_verified_client_certificate_suffices(tmp_path, pki) -> None:
    tls = {"server_tls": {"cert": str(pki.server_cert), "key": str(pki.server_key), "ca": str(pki.ca),
                          "client_auth": True},
           "internal_token_env": "CMESH_TEST_INTERNAL_TOKEN"}
    config = mesh_config(tmp_path, {"m": {"source": sleep_model(tmp_path, sleep_ms=1)}}, security=tls)
    assert server_interceptors(config, TOKEN, service="test") == []      # the handshake already decided
    async with running_server(config, ["m"], internal_token=TOKEN) as server:
        client_tls = TLSConfig(ca=str(pki.ca), cert=str(pki.client_cert), key=str(pki.client_key),
                               server_name="localhost")
        async with open_internal_channel(f"127.0.0.1:{server.port}", MeshCredentials(client_tls)) as channel:
            reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelReady(pb.ModelReadyRequest(name="m"),
                                                                               timeout=10)
            assert reply.ready                                                  # no token sent


# ---------------------------------------------------------------- router -> replica

@pytest.mark.parametrize("data_path", ["stream", "unary"])
async def test_the_router_sends_the_token_to_replicas(tmp_path, data_path) -> None:
    source = sleep_model(tmp_path, sleep_ms=1)
    async with running_server(mesh_config(tmp_path, {"m": {"source": source}}, **SECURED), ["m"],
                              internal_token=TOKEN) as backend:
        cfg = mesh_config(tmp_path, {"m": {"source": source, "endpoints": [f"127.0.0.1:{backend.port}"]}},
                          router={"data_path": data_path}, **SECURED)
        from router.server import RouterOptions, RouterServer

        with_token = RouterServer(cfg, RouterOptions(port=0, internal_token=TOKEN))
        await with_token.start()
        try:
            client = AsyncClient(f"127.0.0.1:{with_token.port}")
            results = await asyncio.gather(*(client.infer("m", x(i), timeout=10) for i in range(4)))
            assert [r.outputs["y"][0, 0] for r in results] == [0, 1, 2, 3]
            await client.close()
        finally:
            await with_token.stop(grace=1.0)
        # A router without the token is refused by the replica: the mesh is closed to it too.
        async with running_router(cfg) as router:
            client = AsyncClient(f"127.0.0.1:{router.port}")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.infer("m", x(1), timeout=10)
            await client.close()
    # (The stream path reports its broken stream as UNAVAILABLE, with the replica's reason.)
    assert info.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE)
    assert HEADER in info.value.details()


# ---------------------------------------------------------------- autoscaler



@asynccontextmanager
async def autoscaler_service(config, token):
    controller = Controller(config, IdleProvider())
    server = grpc_server(config, server_interceptors(config, token, service="autoscaler"))
    mesh_pb2_grpc.add_AutoscalerServicer_to_server(AutoscalerServicer(controller), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", controller
    finally:
        await server.stop(None)


async def test_every_autoscaler_rpc_needs_the_token(replica_config) -> None:
    async with autoscaler_service(replica_config, TOKEN) as (address, controller):
        async with grpc.aio.insecure_channel(address) as channel:
            stub = mesh_pb2_grpc.AutoscalerStub(channel)

            async def reports():
                yield mesh_pb2.LoadReport(source="forger", models=[mesh_pb2.ModelLoad(model="m", in_flight=200)])

            async def watch(md):
                async for table in stub.WatchEndpoints(mesh_pb2.WatchEndpointsRequest(), metadata=md, timeout=2):
                    return table

            calls = {"Status": lambda md: stub.Status(mesh_pb2.StatusRequest(), metadata=md, timeout=5),
                     "Warm": lambda md: stub.Warm(mesh_pb2.WarmRequest(model="m"), metadata=md, timeout=5),
                     "ReportLoad": lambda md: stub.ReportLoad(reports(), metadata=md, timeout=5),
                     "WatchEndpoints": watch}
            for name, call in calls.items():
                assert await code_of(call(())) == grpc.StatusCode.UNAUTHENTICATED, name
                assert await code_of(call(meta("x" * len(TOKEN)))) == grpc.StatusCode.UNAUTHENTICATED, name
            assert controller.window.latest("m") is None            # the forged report never counted
            await stub.ReportLoad(reports(), metadata=meta(TOKEN), timeout=5)
            assert controller.window.latest("m")["concurrency"] == 200
            status = await stub.Status(mesh_pb2.StatusRequest(), metadata=meta(TOKEN), timeout=5)
            assert [m.model for m in status.models] == ["m"]


# ---------------------------------------------------------------- entry points

def test_the_token_is_read_from_the_named_variable_only() -> None:
    config = mesh_config(REPO, {}, **SECURED)
    assert token_from_env(config, {"CMESH_TEST_INTERNAL_TOKEN": f" {TOKEN}\n"}) == TOKEN
    assert token_from_env(mesh_config(REPO, {}), {"CMESH_TEST_INTERNAL_TOKEN": TOKEN}) is None
    with pytest.raises(ConfigError, match="CMESH_TEST_INTERNAL_TOKEN is not set"):
        token_from_env(config, {})
    with pytest.raises(ConfigError, match="at least 16"):
        token_from_env(config, {"CMESH_TEST_INTERNAL_TOKEN": "short"})
    assert TOKEN not in repr(MeshCredentials(token=TOKEN))          # never in a log line


@pytest.mark.parametrize("module", ["model_server", "router", "autoscaler"])
def test_a_service_told_to_require_a_token_refuses_to_start_without_one(tmp_path, module) -> None:
    cfg = write_config(tmp_path / "mesh.yaml", {"store": str(tmp_path), "models": {"m": {
        "source": sleep_model(tmp_path, sleep_ms=1)}}, "autoscaler": {"listen": "127.0.0.1:0"}, **SECURED})
    args = {"model_server": ["--models", "m", "--port", "0"], "router": ["--port", "0"],
            "autoscaler": ["--no-fork-server"]}[module]
    env = {k: v for k, v in os.environ.items() if k != "CMESH_TEST_INTERNAL_TOKEN"}
    env["CMESH_STATE_DIR"] = str(tmp_path / "state")
    out = subprocess.run([sys.executable, "-m", module, "--config", str(cfg), *args], capture_output=True,
                         text=True, timeout=120, cwd=REPO, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "security.internal_token_env: the environment variable CMESH_TEST_INTERNAL_TOKEN is not set" \
        in out.stderr


async def test_cmesh_status_sends_the_token_the_config_names(tmp_path, monkeypatch, capsys) -> None:
    from cmesh.cli import main

    source = sleep_model(tmp_path, sleep_ms=1)
    cfg_path = write_config(tmp_path / "mesh.yaml", {"store": str(tmp_path), "models": {"m": {"source": source}},
                                                     **SECURED})
    async with autoscaler_service(mesh_config(tmp_path, {"m": {"source": source}}, **SECURED), TOKEN) as (address, _):
        monkeypatch.delenv("CMESH_TEST_INTERNAL_TOKEN", raising=False)
        assert await asyncio.to_thread(main, ["status", "--autoscaler", address, "--config", str(cfg_path)]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        monkeypatch.setenv("CMESH_TEST_INTERNAL_TOKEN", TOKEN)
        assert await asyncio.to_thread(main, ["status", "--autoscaler", address, "--config", str(cfg_path),
                                              "--json"]) == 0
        assert '"model": "m"' in capsys.readouterr().out
