"""The trust layer under hostile sizes, internal models and output masking, on
real gRPC servers: size limits come first, large texts are masked off the event
loop, internal models answer only as pipeline nodes, and answers are masked."""
from __future__ import annotations

import asyncio
import json

import grpc
import numpy as np
import pytest

from cmesh.client import AsyncClient
from cmesh.looplag import LoopLagProbe
from meshtest import identity_text_model, mesh_config, running_router, running_server
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from protos import mesh_pb2, mesh_pb2_grpc


def text(value: str) -> dict:
    return {"text": np.array([value.encode()], dtype=object)}


@pytest.fixture
async def echo_mesh(tmp_path):
    source = identity_text_model(tmp_path)
    async with running_server(mesh_config(tmp_path, {"echo": {"source": source}},
                                          server={"max_message_bytes": 8 * 2**20}), ["echo"]) as backend:
        endpoints = [f"127.0.0.1:{backend.port}"]
        cfg = mesh_config(tmp_path, {
            "echo": {"source": source, "endpoints": endpoints},
            "rows": {"source": source, "endpoints": endpoints, "internal": True,
                     "trust": {"mask_outputs": True, "redact_fields": ["customer_name"]}}},
            pipelines={"lookup": {"nodes": {"q": {"model": "rows", "input": "request.text"}}}},
            server={"max_message_bytes": 8 * 2**20, "limits": {"max_text_bytes": 2 * 2**20}})
        # The replica is told about "rows" too, so it can serve it.
        async with running_server(mesh_config(tmp_path, {"rows": {"source": source}}), ["rows"]) as rows:
            cfg.models["rows"].endpoints = [f"127.0.0.1:{rows.port}"]
            async with running_router(cfg) as router:
                yield router


async def test_text_over_the_limit_is_refused_before_any_masking(echo_mesh) -> None:
    client = AsyncClient(f"127.0.0.1:{echo_mesh.port}")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.infer("echo", text("a@b.co " * 500_000), timeout=30)      # 3.5 MB
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("inputs:") and "limit" in info.value.details()
    finally:
        await client.close()


async def test_large_texts_are_masked_off_the_event_loop(echo_mesh) -> None:
    await echo_mesh.core.trust.pool.start()
    client = AsyncClient(f"127.0.0.1:{echo_mesh.port}")
    probe = LoopLagProbe(interval_s=0.005)
    try:
        await client.infer("echo", text("warm up"), timeout=30)
        big = ("write to jane@example.com or call +44 20 7946 0958. " * 36_000)[:1_900_000]
        order: list[str] = []

        async def large() -> np.ndarray:
            out = await client.infer("echo", text(big), timeout=60)
            order.append("large")
            return out.outputs["echo"]

        async def small() -> None:
            await asyncio.sleep(0.02)
            out = await client.infer("echo", text("mail me: joe@example.org"), timeout=30)
            assert out.outputs["echo"][0] == b"mail me: [EMAIL]"
            order.append("small")

        probe.start()
        echoed, _ = await asyncio.gather(large(), small())
        probe.stop()
        # The router's own probe too: the masking never held its loop.
        assert echo_mesh.loop_lag.max_lag_s < 0.1, echo_mesh.loop_lag.max_lag_s
        assert probe.max_lag_s < 0.1, probe.max_lag_s
        assert order == ["small", "large"]
        masked = echoed[0].decode()
        assert "jane@example.com" not in masked and "[EMAIL]" in masked and "[PHONE]" in masked
    finally:
        await client.close()


async def test_internal_models_answer_only_as_pipeline_nodes(echo_mesh) -> None:
    addr = f"127.0.0.1:{echo_mesh.port}"
    client = AsyncClient(addr)
    try:
        for call in (client.infer("rows", text("x"), timeout=10),):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "internal" in info.value.details()
        async with grpc.aio.insecure_channel(addr) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelMetadata(pb.ModelMetadataRequest(name="rows"), timeout=10)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            rows = [{"customer_name": "Jane Roe", "customer_email": "jane@example.com", "status": "shipped"}]
            pipelines = mesh_pb2_grpc.PipelinesStub(channel)
            # The input's e-mail is masked on the way in; the name only on the way out.
            answer = await pipelines.Run(mesh_pb2.RunRequest(pipeline="lookup",
                                                             inputs={"text": json.dumps(rows)}), timeout=30)
            out = json.loads(json.loads(answer.outputs_json)["q"]["echo"])
            assert out == [{"customer_name": "[REDACTED]", "customer_email": "[EMAIL]", "status": "shipped"}]
    finally:
        await client.close()
