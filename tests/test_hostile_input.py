"""Hostile input on real gRPC servers (router and model server): every declared
size is checked against the bytes present first, undecodable messages and bad
parameters are INVALID_ARGUMENT, echoed names are clipped, and one tenant's
garbage never opens a component's breaker for the others."""
from __future__ import annotations

import resource
import struct

import grpc
import numpy as np
import pytest

from cmesh.client import AsyncClient
from cmesh.errors import component_error_of
from meshtest import identity_text_model, mesh_config, running_router, running_server, sleep_model
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from router.auth import Authenticator

ENV = {"KEYS_ACME": "acme-key", "KEYS_GLOBEX": "globex-key"}

# (datatype, shape, raw bytes): each declares far more than it carries, or is malformed.
HOSTILE_SHAPES = [
    ("BYTES", [2**27], b"\x05\x00\x00\x00hello"),
    ("BYTES", [2**30], b"\x00" * 16),
    ("FP32", [2**34], b"\x00" * 16),
    ("FP32", [2**40], b"\x00" * 16),
    ("FP32", [2**62, 4], b"\x00" * 16),
    ("FP32", [2**32, 2**32], b"\x00" * 16),
    ("FP32", [1] * 65, b"\x00" * 4),
    ("FP32", [-1], b"\x00" * 4),
    ("FP32", [-2**63], b"\x00" * 4),
    ("BYTES", [-1], b"\x00" * 4),
    ("INT64", [2**61], b""),
    ("NOPE", [1], b"\x00" * 4),
]


def hostile_request(model: str, datatype: str, shape: list[int], raw: bytes, name: str = "x") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


def good_request(model: str = "m") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.full((1, 4), 7, dtype=np.float32).tobytes())
    return request


async def code_of(call) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.fixture
async def mesh(tmp_path):
    source = sleep_model(tmp_path, sleep_ms=0)
    echo = identity_text_model(tmp_path)
    backend_cfg = mesh_config(tmp_path, {"m": {"source": source}, "echo": {"source": echo}})
    async with running_server(backend_cfg, ["m", "echo"]) as backend:
        endpoint = [f"127.0.0.1:{backend.port}"]
        cfg = mesh_config(tmp_path, {"m": {"source": source, "endpoints": endpoint},
                                     "echo": {"source": echo, "endpoints": endpoint}},
                          router={"breaker": {"failure_threshold": 2}})
        async with running_router(cfg) as router:
            yield router, backend


@pytest.mark.parametrize("target", ["router", "replica"])
async def test_hostile_shapes_are_invalid_argument_and_cost_nothing(mesh, target) -> None:
    router, backend = mesh
    port = router.port if target == "router" else backend.port
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for datatype, shape, raw in HOSTILE_SHAPES:
            code, message = await code_of(stub.ModelInfer(hostile_request("m", datatype, shape, raw), timeout=10))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (datatype, shape, code, message)
            assert message.startswith("x:"), message          # names the input
            ok = await stub.ModelInfer(good_request(), timeout=10)
            assert np.frombuffer(ok.raw_output_contents[0], np.float32).tolist() == [7.0] * 4
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert grown_mb < 64, f"rejecting hostile shapes grew the process by {grown_mb:.0f} MB"


@pytest.mark.parametrize("target", ["router", "replica"])
async def test_undecodable_messages_are_invalid_argument(mesh, target) -> None:
    router, backend = mesh
    port = router.port if target == "router" else backend.port
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        methods = ["/inference.GRPCInferenceService/ModelInfer", "/inference.GRPCInferenceService/ModelReady",
                   "/inference.GRPCInferenceService/ModelMetadata"]
        if target == "router":
            methods += ["/cmesh.v1.Pipelines/Run", "/cmesh.v1.Admin/CostReport"]
        for method in methods:
            call = channel.unary_unary(method)(b"\xff\xff\xff\xff", timeout=10)
            code, message = await code_of(call)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code, message)
            assert "do not parse" in message
        # On a stream: the bad message is answered, the good ones around it too.
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                       response_deserializer=pb.ModelStreamInferResponse.FromString)
        good = good_request()
        good.id = "before"
        after = good_request()
        after.id = "after"
        answers = [r async for r in stream(iter([good.SerializeToString(), b"\x0a\xff\xff",
                                                   after.SerializeToString()]), timeout=20)]
        assert len(answers) == 3
        errors = [a.error_message for a in answers if a.error_message]
        assert len(errors) == 1 and errors[0].startswith("INVALID_ARGUMENT: request:"), errors
        assert {a.infer_response.id for a in answers if not a.error_message} == {"before", "after"}


@pytest.mark.parametrize("value", ["abc", float("-inf"), float("nan"), -5, 0, "-1", True])
async def test_bad_timeout_parameter_is_invalid_argument(mesh, value) -> None:
    router, backend = mesh
    for port in (router.port, backend.port):
        client = AsyncClient(f"127.0.0.1:{port}")
        try:
            code, message = await code_of(client.infer("m", {"x": np.ones((1, 4), np.float32)},
                                                       parameters={"cmesh-timeout-ms": value}, timeout=10))
        finally:
            await client.close()
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (port, value, code, message)
        assert message.startswith("cmesh-timeout-ms:"), message


async def test_bad_identifiers_are_invalid_argument(mesh) -> None:
    router, _ = mesh
    client = AsyncClient(f"127.0.0.1:{router.port}")
    try:
        for key, value in (("cmesh-request-id", "r" * 10_000), ("cmesh-pipeline-id", 12),
                           ("cmesh-latency-class", "urgent"), ("cmesh-session", "s" * 1000)):
            code, message = await code_of(client.infer("m", {"x": np.ones((1, 4), np.float32)},
                                                       parameters={key: value}, timeout=10))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (key, code)
            assert message.startswith(f"{key}:"), message
            assert len(message) < 300
    finally:
        await client.close()


@pytest.mark.parametrize("target", ["router", "replica"])
async def test_echoed_names_are_clipped(mesh, target) -> None:
    router, backend = mesh
    port = router.port if target == "router" else backend.port
    huge = "n" * 100_000
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(good_request(huge), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert len(info.value.details()) < 2000
        detail = component_error_of(info.value).detail
        assert detail is not None and len(detail.component) < 400
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(hostile_request("m", "FP32", [1], b"\x00" * 4, name=huge), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(info.value.details()) < 2000


async def test_one_tenants_garbage_does_not_open_the_breaker(tmp_path) -> None:
    source = sleep_model(tmp_path, sleep_ms=0)
    async with running_server(mesh_config(tmp_path, {"m": {"source": source}}), ["m"]) as backend:
        cfg = mesh_config(tmp_path, {"m": {"source": source, "endpoints": [f"127.0.0.1:{backend.port}"]}},
                          router={"breaker": {"failure_threshold": 2}},
                          tenants={"acme": {"api_keys_env": "KEYS_ACME", "rate_per_s": 1000},
                                   "globex": {"api_keys_env": "KEYS_GLOBEX", "rate_per_s": 1000}})
        async with running_router(cfg, auth=Authenticator.from_env(cfg, ENV)) as router:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                acme = [("authorization", "Bearer acme-key")]
                for datatype, shape, raw in HOSTILE_SHAPES * 3:
                    code, _ = await code_of(stub.ModelInfer(hostile_request("m", datatype, shape, raw),
                                                            metadata=acme, timeout=10))
                    assert code == grpc.StatusCode.INVALID_ARGUMENT
                # Bytes the replica's engine refuses (a text where FP32 belongs) are
                # INVALID_ARGUMENT from the replica: the component answered sensibly.
                wrong = hostile_request("m", "BYTES", [1], struct.pack("<I", 2) + b"hi")
                for _ in range(5):
                    code, _ = await code_of(stub.ModelInfer(wrong, metadata=acme, timeout=10))
                    assert code == grpc.StatusCode.INVALID_ARGUMENT
                ok = await stub.ModelInfer(good_request(), metadata=[("authorization", "Bearer globex-key")],
                                           timeout=10)
                assert np.frombuffer(ok.raw_output_contents[0], np.float32)[0] == 7.0
                assert router.metrics.value("cmesh_router_breaker_state", component="m:default") == 0
