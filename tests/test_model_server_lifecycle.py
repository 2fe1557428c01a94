"""Server lifecycle on timing-only engines: drain on SIGTERM, batch isolation
over gRPC, streaming of non-generative models, loading from an fsspec store."""
import asyncio
import signal
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cmesh.client import AsyncClient, Client, build_request
from cmesh.store import ModelStore
from meshtest import ServerProcess, mesh_config, running_server, sleep_model, write_config


def x(value: float, rows: int = 1) -> dict:
    return {"x": np.full((rows, 4), value, dtype=np.float32)}


def test_sigterm_drains_in_flight_work_then_exits(tmp_path) -> None:
    source = sleep_model(tmp_path / "store", sleep_ms=400, max_batch_size=2, max_queue_delay_ms=0)
    cfg = write_config(tmp_path / "mesh.yaml", {"store": str(tmp_path / "store"),
                                                "models": {"slow": {"source": source}}})
    server = ServerProcess(cfg, ["slow"], "--grace", "30", "--drain-delay", "1.5")
    results: list = []

    def call(v: float) -> None:
        with Client(server.address) as c:
            try:
                results.append(c.infer("slow", x(v), timeout=30).outputs["y"][0, 0])
            except grpc.RpcError as exc:
                results.append(exc.code())

    threads = [threading.Thread(target=call, args=(float(i),)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.3)                      # all six accepted; the first batch is running
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]     # every accepted request answered
    assert server.stop(timeout=60) == 0


async def test_poisoned_request_over_grpc_fails_alone(tmp_path) -> None:
    source = sleep_model(tmp_path, sleep_ms=30, max_batch_size=8, max_queue_delay_ms=20)
    config = mesh_config(tmp_path, {"sleepy": {"source": source}})
    async with running_server(config, ["sleepy"]) as server:
        client = AsyncClient(f"127.0.0.1:{server.port}")
        solo = await client.infer("sleepy", x(2.0))
        calls = [client.infer("sleepy", x(float(i)), parameters={"poison": i == 3}) for i in range(6)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        await client.close()
    for i, r in enumerate(results):
        if i == 3:
            assert isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.INTERNAL
            assert "poisoned" in r.details()
        else:
            assert r.outputs["y"].tolist() == [[float(i)] * 4]
            assert r.parameters["cmesh-batch-size"] > 1          # they did share a batch
    assert results[2].outputs["y"].tolist() == solo.outputs["y"].tolist()


async def test_stream_infer_answers_each_request_by_id_and_errors_in_band(tmp_path) -> None:
    source = sleep_model(tmp_path, sleep_ms=5)
    config = mesh_config(tmp_path, {"sleepy": {"source": source}})
    async with running_server(config, ["sleepy"]) as server:
        client = AsyncClient(f"127.0.0.1:{server.port}")
        requests = [build_request("sleepy", x(float(i)), request_id=f"r{i}") for i in range(4)]
        requests.append(build_request("sleepy", {"x": np.zeros((1, 3), dtype=np.float32)}, request_id="bad"))
        responses = [r async for r in client.stream(requests)]
        await client.close()
    by_id = {r.infer_response.id: r for r in responses}
    assert set(by_id) == {"r0", "r1", "r2", "r3", "bad"}
    assert by_id["bad"].error_message.startswith("INVALID_ARGUMENT: x: shape [1, 3]")
    assert by_id["bad"].infer_response.parameters["cmesh-error-field"].string_param == "x"
    for i in range(4):
        r = by_id[f"r{i}"]
        assert r.error_message == "" and r.infer_response.parameters["triton_final_response"].bool_param


async def test_model_loads_from_an_fsspec_store(tmp_path) -> None:
    from cmesh.push import push_version

    local = tmp_path / "local"
    sleep_model(local, name="remote-model", sleep_ms=1)
    store = ModelStore("memory://teststore", cache_dir=tmp_path / "cache")
    push_version(local / "remote-model" / "1", store, "remote-model", "1", force=True)
    assert store.versions() == [("remote-model", "1")]
    version = store.open("store://remote-model/1")
    assert version.local_dir.is_relative_to(tmp_path / "cache") and (version.local_dir / "model.yaml").exists()
    config = mesh_config(local, {"m": {"source": "store://remote-model/1"}})
    config.store = "memory://teststore"
    async with running_server(config, ["m"]) as server:
        client = AsyncClient(f"127.0.0.1:{server.port}")
        assert (await client.infer("m", x(1.0))).outputs["y"].shape == (1, 4)
        await client.close()


def test_unknown_model_on_the_command_line_is_a_clear_error(tmp_path) -> None:
    import subprocess
    import sys

    cfg = write_config(tmp_path / "mesh.yaml", {"models": {"a": {"source": "store://a/1"}}})
    out = subprocess.run([sys.executable, "-m", "model_server", "--config", str(cfg), "--models", "b"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--models: unknown model 'b'" in out.stderr
    helped = subprocess.run([sys.executable, "-m", "model_server", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert helped.returncode == 0 and "--models" in helped.stdout and "--metrics-port" in helped.stdout


async def test_a_propagated_deadline_bounds_the_wait_inside_the_model_server(tmp_path) -> None:
    from cmesh.errors import component_error_of

    source = sleep_model(tmp_path, sleep_ms=300, max_batch_size=1, max_queue_delay_ms=0)
    config = mesh_config(tmp_path, {"slow": {"source": source}})
    async with running_server(config, ["slow"]) as server:
        client = AsyncClient(f"127.0.0.1:{server.port}")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.infer("slow", x(1.0), parameters={"cmesh-timeout-ms": 50}, timeout=10)
        assert component_error_of(info.value).code == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.infer("slow", x(1.0), parameters={"cmesh-timeout-ms": "soon"}, timeout=10)
        assert info.value.details().startswith("cmesh-timeout-ms:")
        await client.close()
