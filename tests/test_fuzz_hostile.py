"""Property-based fuzzing of the router and the model server with hypothesis.

Generated ModelInferRequests (hostile shapes, datatypes, sizes, parameters,
names) and raw byte strings go to an in-process router and model server, which
run on an event loop of their own in a thread, watched by a loop-lag probe.
For every example: never UNKNOWN or INTERNAL, the servers keep serving, a good
request right after it gets its normal answer, and no stall of the loop over
100 ms. Derandomized, so CI sees the same examples every run; bounded by
max_examples (at least 1,000 in all)."""
from __future__ import annotations

import asyncio
import gc
import math
import struct
import threading
import time

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmesh.looplag import LoopLagProbe
from cmesh.proc import settle_heap
from cmesh.tensors import set_param
from meshtest import identity_text_model, mesh_config, running_router, running_server, sleep_model
from protos import inference_pb2 as pb

INFER = "/inference.GRPCInferenceService/ModelInfer"
BAD_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
MODELS = ["m", "echo", "kb-index", "sql-executor"]
DATATYPES = ["BOOL", "UINT8", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES", "fp32", "", "STRING"]
DIMS = st.one_of(st.integers(-3, 8), st.sampled_from([0, 384, 2**16, 2**27, 2**31, 2**32, 2**40, 2**62,
                                                      2**63 - 1, -2**63]))
PARAM_VALUES = st.one_of(st.text(max_size=20), st.integers(-2**63, 2**63 - 1), st.booleans(),
                         st.floats(allow_nan=True, allow_infinity=True))
PARAM_KEYS = st.sampled_from(["cmesh-timeout-ms", "cmesh-request-id", "cmesh-latency-class", "cmesh-session",
                              "cmesh-pipeline-id", "cmesh-collect", "top_k", "max_tokens", "temperature", "seed",
                              "x"])


class Mesh:
    """A model server and a router on an event loop in a thread of their own."""

    def __init__(self, tmp_path, demo_store) -> None:
        self.tmp_path, self.demo_store = tmp_path, demo_store
        self.ready = threading.Event()
        self.probe = LoopLagProbe(interval_s=0.005)
        self.error: BaseException | None = None

    async def _main(self) -> None:
        store = self.demo_store
        sleep_model(store, "fuzz-m", sleep_ms=0)
        identity_text_model(store, "fuzz-echo")
        sources = {"m": "store://fuzz-m/1", "echo": "store://fuzz-echo/1",
                   "kb-index": "store://kb-index/1", "sql-executor": "store://sql-executor/1"}
        backend = mesh_config(store, {name: {"source": s} for name, s in sources.items()})
        async with running_server(backend, MODELS) as server:
            self.replica = f"127.0.0.1:{server.port}"
            endpoint = [self.replica]
            cfg = mesh_config(store, {name: {"source": s, "endpoints": endpoint} for name, s in sources.items()},
                              router={"breaker": {"failure_threshold": 3}})
            async with running_router(cfg) as router:
                self.router = f"127.0.0.1:{router.port}"
                self.router_server = router
                self._stop = asyncio.Event()
                self._loop = asyncio.get_running_loop()
                settle_heap()            # as the services' entry points do once ready
                self.probe.start()
                self.ready.set()
                await self._stop.wait()
                self.probe.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc
            self.ready.set()

    def start(self) -> "Mesh":
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(120), "mesh did not start"
        if self.error is not None:
            raise self.error
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(60)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, demo_store):
    m = Mesh(tmp_path_factory.mktemp("fuzz"), demo_store).start()
    m.channels = {t: grpc.insecure_channel(addr) for t, addr in (("router", m.router), ("replica", m.replica))}
    for channel in m.channels.values():      # first calls open streams and caches: not what is measured
        channel.unary_unary(INFER)(good_request(), timeout=30)
    # The services run in this process, beside the whole test session's objects: a
    # full collection of that heap (100+ ms late in the suite) would stall their
    # loop and read as a service's stall. Frozen, the collector leaves it alone
    # and sees only what the services and the examples allocate.
    gc.collect()
    gc.freeze()
    m.probe.max_lag_s = 0.0
    yield m
    gc.unfreeze()
    for channel in m.channels.values():
        channel.close()
    m.stop()


def good_request() -> bytes:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.arange(4, dtype=np.float32).tobytes())
    return request.SerializeToString()


def bytes_elements(values: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


@st.composite
def tensors(draw, raw: bool):
    name = draw(st.sampled_from(["x", "text", "embedding", "query", "params", "", "n" * 300]))
    datatype = draw(st.sampled_from(DATATYPES))
    shape = draw(st.lists(DIMS, max_size=draw(st.sampled_from([3, 3, 3, 70]))))
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    if raw:
        data = draw(st.one_of(
            st.binary(max_size=64),
            st.builds(bytes_elements, st.lists(st.binary(max_size=16), max_size=6)),
            st.builds(lambda n: np.ones(n, np.float32).tobytes(), st.integers(0, 1600))))
        return tensor, data
    kind = draw(st.sampled_from(["fp32_contents", "int64_contents", "bytes_contents", "bool_contents"]))
    if kind == "fp32_contents":
        tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=8)))
    elif kind == "int64_contents":
        tensor.contents.int64_contents.extend(draw(st.lists(st.integers(-2**63, 2**63 - 1), max_size=8)))
    elif kind == "bytes_contents":
        tensor.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=24), max_size=6)))
    else:
        tensor.contents.bool_contents.extend(draw(st.lists(st.booleans(), max_size=8)))
    return tensor, None


@st.composite
def requests(draw) -> bytes:
    raw = draw(st.booleans())
    request = pb.ModelInferRequest(model_name=draw(st.one_of(st.sampled_from(MODELS), st.text(max_size=40))),
                                   model_version=draw(st.sampled_from(["", "", "default", "9", "v" * 200])),
                                   id=draw(st.text(max_size=10)))
    for tensor, data in draw(st.lists(tensors(raw), max_size=3)):
        request.inputs.append(tensor)
        if data is not None:
            request.raw_input_contents.append(data)
    if draw(st.booleans()) and request.raw_input_contents:
        request.raw_input_contents.append(b"extra")
    for key, value in draw(st.dictionaries(PARAM_KEYS, PARAM_VALUES, max_size=3)).items():
        set_param(request.parameters, key, value)
    for name in draw(st.lists(st.sampled_from(["y", "echo", "rows", "nope"]), max_size=2)):
        request.outputs.add(name=name)
    return request.SerializeToString()


def flipped(data: bytes, positions: list[int]) -> bytes:
    out = bytearray(data)
    for p in positions:
        if out:
            out[p % len(out)] ^= 0xFF
    return bytes(out)


RAW_BYTES = st.one_of(st.binary(max_size=256),
                      st.builds(flipped, st.just(good_request()), st.lists(st.integers(0, 10_000), max_size=4)))


def check(mesh: Mesh, target: str, payload: bytes) -> None:
    mesh.probe.max_lag_s = 0.0            # per example: a stall is the one example's doing
    channel = mesh.channels[target]
    infer = channel.unary_unary(INFER, response_deserializer=pb.ModelInferResponse.FromString)
    try:
        infer(payload, timeout=10)
    except grpc.RpcError as exc:
        assert exc.code() not in BAD_CODES, f"{target}: {exc.code().name}: {exc.details()}"
        assert exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED, f"{target} stalled: {exc.details()}"
    answer = infer(good_request(), timeout=10)
    assert np.frombuffer(answer.raw_output_contents[0], np.float32).tolist() == [0.0, 1.0, 2.0, 3.0]
    assert mesh.thread.is_alive()
    time.sleep(2 * mesh.probe.interval_s)    # so a stall this example caused is observed now
    assert mesh.probe.max_lag_s < 0.1, f"event loop stalled {mesh.probe.max_lag_s * 1000:.0f} ms"


FUZZ = settings(max_examples=350, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


@pytest.mark.parametrize("target", ["router", "replica"])
@FUZZ
@given(payload=requests())
def test_generated_requests_never_break_a_service(mesh, target, payload) -> None:
    check(mesh, target, payload)


@pytest.mark.parametrize("target", ["router", "replica"])
@settings(FUZZ, max_examples=200)
@given(payload=RAW_BYTES)
def test_raw_bytes_never_break_a_service(mesh, target, payload) -> None:
    check(mesh, target, payload)


def test_the_breaker_stayed_closed_for_every_component(mesh) -> None:
    metrics = mesh.router_server.metrics
    for model in MODELS:
        assert metrics.value("cmesh_router_breaker_state", component=f"{model}:default") == 0, model
    assert math.isfinite(mesh.probe.max_lag_s)
