"""A real third-party OIP server behind the router (issue #12, acceptance 1 and 2).

Two ``kserve.ModelServer`` processes (tests/kserve_model.py, KServe from PyPI in a
venv of its own: its stubs register the protobuf package ``inference`` too) serve
``doubler`` as the ``oip`` backend of ``kdoubler``, beside a mesh replica of
``sleepy``; ``spilly`` has a dedicated mesh replica and spills over into the KServe
pool. Every call to KServe carries the backend's credential (the model refuses
calls without it) and no ``cmesh-*`` parameter (it refuses those too).

The tests share one mesh and run in order: tritonclient, KServe's own stubs, a
pipeline node, spill-over; then the KServe answering is SIGKILLed (the other takes
over), then the other (the breaker opens), and new ones on their ports close it;
last, every request is found metered exactly once.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from cmesh.client import build_request
from cmesh.errors import component_error_of
from cmesh.tensors import decode_outputs
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from protos import mesh_pb2, mesh_pb2_grpc
from tests.meshtest import REPO, free_port, mesh_config, running_server, sleep_model

TOKEN = "kserve-test-token"
X = {"x": np.arange(4, dtype=np.float32).reshape(1, 4)}
SENT: dict[str, int] = {"kdoubler": 0, "spilly": 0}       # requests sent per model, for metering


def kserve_python() -> Path:
    """The KServe venv's Python (``make kserve-venv`` builds it; built here if missing)."""
    venv = Path(os.environ.get("CMESH_KSERVE_VENV", REPO / ".cmesh" / "kserve-venv"))
    python = venv / "bin" / "python"
    if not python.exists() or subprocess.run([python, "-c", "import kserve"], capture_output=True).returncode:
        build = subprocess.run(["make", "-C", str(REPO), "kserve-venv", f"KSERVE_VENV={venv}"],
                               capture_output=True, text=True)
        if build.returncode:
            pytest.fail(f"cannot build the KServe venv ({venv}): {build.stderr[-2000:]}\n"
                        "run `make kserve-venv` where PyPI is reachable")
    return python


class KServe:
    def __init__(self, python: Path, tag: str, port: int | None = None) -> None:
        self.tag = tag
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([str(python), str(REPO / "tests" / "kserve_model.py"),
                                      "--grpc-port", str(self.port), "--http-port", str(free_port()),
                                      "--tag", tag, "--token", TOKEN],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    async def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"KServe {self.tag} exited: {self.proc.stderr.read()[-3000:]}")
                try:
                    if (await stub.ModelReady(pb.ModelReadyRequest(name="doubler"), timeout=1)).ready:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.2)        # a child process starting: nothing to wait on but its port
        raise RuntimeError(f"KServe {self.tag} not ready in {timeout}s")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc.stderr.close()


def oip(*addresses: str) -> dict:
    return {"kind": "oip", "endpoints": list(addresses), "model_name": "doubler",
            "credential": {"env": "KSERVE_TEST_TOKEN", "prefix": "Bearer "}}


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory):
    from router.backends.secrets import secrets_from_env
    from router.server import RouterOptions, RouterServer

    python = kserve_python()
    k1, k2 = KServe(python, "k1"), KServe(python, "k2")
    store = tmp_path_factory.mktemp("store")
    models = {"sleepy": {"source": sleep_model(store, "sleepy", sleep_ms=1)},
              "spilly": {"source": sleep_model(store, "spilly", sleep_ms=150, max_batch_size=1,
                                               max_queue_delay_ms=0)}}
    kservers = [k1, k2]
    try:
        async with running_server(mesh_config(store, models), ["sleepy", "spilly"]) as replica:
            address = f"127.0.0.1:{replica.port}"
            config = mesh_config(store, {
                "sleepy": {**models["sleepy"], "endpoints": [address]},
                "spilly": {**models["spilly"], "endpoints": {"dedicated": [address]},
                           "deployment": {"mode": "auto", "dedicated_replicas": 1, "max_inflight_per_replica": 2,
                                          "capacity_threshold": 0.5},
                           "backend": {"spill_over": oip(k1.address, k2.address)}},
                "kdoubler": {"backend": oip(k1.address, k2.address)}},
                pipelines={"twice": {"nodes": {
                    "first": {"model": "sleepy", "input": "[1.0, 2.0, 3.0, 4.0]"},
                    "second": {"model": "kdoubler", "input": "first.y"}}}},
                router={"breaker": {"failure_threshold": 3, "cool_down_s": 1.0},
                        "outlier": {"consecutive_failures": 1, "base_ejection_s": 60},
                        "retry": {"min_retries_per_s": 100}})
            secrets = secrets_from_env(config, {"KSERVE_TEST_TOKEN": TOKEN})
            await asyncio.gather(k1.wait_ready(), k2.wait_ready())
            router = RouterServer(config, RouterOptions(port=0, backend_secrets=secrets))
            await router.start()
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
                    yield {"router": router, "channel": channel, "stub": pb_grpc.GRPCInferenceServiceStub(channel),
                           "kservers": kservers, "python": python}
            finally:
                await router.stop(grace=1.0)
    finally:
        for k in kservers:
            k.kill()


async def infer(mesh, model: str, timeout: float = 10) -> pb.ModelInferResponse:
    SENT[model] = SENT.get(model, 0) + 1
    return await mesh["stub"].ModelInfer(build_request(model, X), timeout=timeout)


def sample(mesh, name: str, **labels) -> float:
    return mesh["router"].metrics.registry.get_sample_value(name, labels) or 0.0


TRITON_PROBE = """
import json, sys, numpy as np, tritonclient.grpc as tc
c = tc.InferenceServerClient(sys.argv[1])
x = tc.InferInput("x", [1, 4], "FP32"); x.set_data_from_numpy(np.arange(4, dtype=np.float32).reshape(1, 4))
r = c.infer("kdoubler", [x])
params = r.get_response().parameters
print(json.dumps({"y": r.as_numpy("y").tolist(), "by": r.as_numpy("served_by")[0].decode(),
                  "ready": c.is_model_ready("kdoubler"), "params": sorted(params),
                  "compute_ms": params["cmesh-compute-ms"].string_param}))
"""


async def test_tritonclient_reaches_the_kserve_model_through_the_router(mesh):
    SENT["kdoubler"] += 1
    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", TRITON_PROBE,
                                                   f"127.0.0.1:{mesh['router'].port}"],
                                  capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["y"] == [[0.0, 2.0, 4.0, 6.0]] and report["by"] in ("k1", "k2") and report["ready"]
    assert "triton_final_response" not in report["params"]          # a clean unary answer
    assert float(report["compute_ms"]) > 0                           # KServe's wall time, as text


KSERVE_STUBS_PROBE = """
import json, sys, numpy as np, grpc
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb, grpc_predict_v2_pb2_grpc as g
stub = g.GRPCInferenceServiceStub(grpc.insecure_channel(sys.argv[1]))
req = pb.ModelInferRequest(model_name="sleepy")
req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
req.raw_input_contents.append(np.ones((1, 4), dtype=np.float32).tobytes())
r = stub.ModelInfer(req, timeout=30)
print(json.dumps({k: r.parameters[k].string_param for k in
                  ("cmesh-compute-ms", "cmesh-queue-ms", "cmesh-router-queue-ms")}))
"""


async def test_kserve_stubs_read_the_timings_of_a_mesh_replica(mesh):
    out = await asyncio.to_thread(subprocess.run, [str(mesh["python"]), "-c", KSERVE_STUBS_PROBE,
                                                   f"127.0.0.1:{mesh['router'].port}"],
                                  capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    timings = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(value != "" and float(value) >= 0 for value in timings.values()), timings
    assert float(timings["cmesh-compute-ms"]) > 0


async def test_a_pipeline_uses_the_kserve_model_as_a_node(mesh):
    SENT["kdoubler"] += 1
    answer = await mesh_pb2_grpc.PipelinesStub(mesh["channel"]).Run(
        mesh_pb2.RunRequest(pipeline="twice", inputs={"text": "-"}, request_id="pipe-1"), timeout=30)
    outputs = json.loads(answer.outputs_json)
    assert outputs["second"]["y"] == [2.0, 4.0, 6.0, 8.0]
    nodes = {n.node: n for n in answer.trace.nodes}
    assert nodes["second"].compute_ms > 0 and nodes["second"].status == "ok"


async def test_a_mesh_model_spills_over_into_the_oip_pool_under_load(mesh):
    answers = await asyncio.gather(*(infer(mesh, "spilly", timeout=30) for _ in range(8)))
    served = [decode_outputs(a).get("served_by") for a in answers]
    by_kserve = [s for s in served if s is not None]
    assert by_kserve and len(by_kserve) < len(answers)         # the dedicated mesh replica took some
    assert sample(mesh, "cmesh_router_spillover_total", model="spilly") >= len(by_kserve)


async def test_a_second_kserve_takes_over_when_the_first_is_sigkilled(mesh):
    # Sequential calls go to the same server (equal load: the lower id): kill that one.
    first = decode_outputs(await infer(mesh, "kdoubler"))["served_by"][0].decode()
    victim = next(k for k in mesh["kservers"] if k.tag == first)
    survivor = next(k for k in mesh["kservers"] if k is not victim)
    victim.kill()
    for _ in range(10):                                # retried before the response started
        answer = await infer(mesh, "kdoubler")
        assert decode_outputs(answer)["served_by"][0].decode() == survivor.tag
    assert sample(mesh, "cmesh_router_retries_total", model="kdoubler", code="UNAVAILABLE") >= 1
    assert sample(mesh, "cmesh_router_outlier_ejections_total", model="kdoubler") >= 1
    mesh["killed"] = [victim, survivor]


async def test_its_breaker_opens_when_every_server_fails_and_closes_when_servers_are_back(mesh):
    victim, survivor = mesh["killed"]
    survivor.kill()
    reasons = []
    for _ in range(6):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await infer(mesh, "kdoubler")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        detail = component_error_of(info.value).detail
        reasons.append(detail.reason if detail else "")
    assert "breaker_open" in reasons
    assert sample(mesh, "cmesh_router_breaker_state", component="kdoubler:default") == 2
    # Both addresses come back (one of them may still be ejected: the other serves).
    back = [KServe(mesh["python"], "k3", port=victim.port), KServe(mesh["python"], "k4", port=survivor.port)]
    mesh["kservers"].extend(back)
    await asyncio.gather(*(k.wait_ready() for k in back))
    deadline = time.monotonic() + 30
    while True:
        try:
            answer = await infer(mesh, "kdoubler")
            break
        except grpc.aio.AioRpcError:
            assert time.monotonic() < deadline, "the breaker never closed"
            await asyncio.sleep(0.5)                  # the cool-down, then a half-open probe
    assert decode_outputs(answer)["served_by"][0].decode() in ("k3", "k4")
    assert sample(mesh, "cmesh_router_breaker_state", component="kdoubler:default") == 0


async def test_every_request_to_kserve_is_metered_exactly_once(mesh):
    router = mesh["router"]
    await router.core.flush_metering()
    rows = await router.meter.rows()
    per_model: dict[str, int] = {}
    external_ns: dict[str, int] = {}
    for row in rows:
        per_model[row.model] = per_model.get(row.model, 0) + row.requests
        external_ns[row.model] = external_ns.get(row.model, 0) + row.external_compute_ns
    assert per_model["kdoubler"] == SENT["kdoubler"]
    assert per_model["spilly"] == SENT["spilly"]
    assert external_ns["kdoubler"] > 0 and external_ns["spilly"] > 0
    assert external_ns.get("sleepy", 0) == 0          # mesh replicas report their own compute
