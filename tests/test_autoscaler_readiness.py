"""The autoscaler's per-model readiness probe: a replica that lost its model (or stops
answering) leaves the endpoint table and is replaced; one slow probe is not enough.
The judge on hand-made outcomes and a fake clock, the monitor on fakes, then the
real autoscaler process, its fork server and replicas with the internal token."""
import asyncio
import os

import grpc
import pytest

from autoscaler.prober import ReadinessMonitor, ReplicaProber
from autoscaler.providers.base import ReplicaHandle
from autoscaler.readiness import ProbeOutcome, ProbeRecord, judge
from cmesh.config import ReadinessProbeConfig
from cmesh.internal_auth import HEADER, MeshCredentials, open_internal_channel
from cmesh.proc import spawn_service
from meshtest import REPO, free_port, mesh_config, running_server, sleep_model, write_config
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from protos import mesh_pb2, mesh_pb2_grpc

CFG = ReadinessProbeConfig(period_s=1.0, timeout_s=0.5, failure_threshold=3)
OK, BAD = ProbeOutcome(True), ProbeOutcome(False, "m:default not ready")
TOKEN = "readiness-test-internal-token"


def test_threshold_consecutive_failures_replace_and_a_success_resets() -> None:
    record = ProbeRecord()
    verdicts = []
    for t, outcome in enumerate([BAD, BAD, OK, BAD, BAD, BAD]):
        record, verdict = judge(record, outcome, float(t), CFG)
        verdicts.append(verdict.replace)
    assert verdicts == [False, False, False, False, False, True]
    assert record.failures == 3 and record.failing_since == 3.0
    assert "3 readiness probes in a row over 2.0s: m:default not ready" in verdict.reason


def test_one_slow_probe_does_not_condemn() -> None:
    record, verdict = judge(ProbeRecord(), ProbeOutcome(False, "DEADLINE_EXCEEDED"), 10.0, CFG)
    assert not verdict.replace and record.failures == 1
    record, verdict = judge(record, OK, 11.0, CFG)
    assert record == ProbeRecord() and not verdict.replace


class FakeProvider:
    def __init__(self, handles):
        self.handles = handles
        self.replaced: list[tuple[str, str]] = []

    def replicas(self):
        return list(self.handles)

    async def replace(self, handle, reason):
        handle.state = "draining"
        self.replaced.append((handle.id, reason))


class ScriptedProber:
    def __init__(self, script):
        self.script = script            # replica id -> outcomes in order
        self.probed: list[str] = []

    async def probe(self, handle):
        self.probed.append(handle.id)
        return self.script[handle.id].pop(0)

    async def forget(self, keep):
        return None

    async def close(self):
        return None


async def test_the_monitor_replaces_only_the_replica_that_keeps_failing() -> None:
    good = ReplicaHandle(id="good", model="m", pool="serverless", state="ready", address="a:1")
    lost = ReplicaHandle(id="lost", model="m", pool="serverless", state="ready", address="a:2")
    warming = ReplicaHandle(id="warming", model="m", pool="serverless", state="warming")
    provider = FakeProvider([good, lost, warming])
    prober = ScriptedProber({"good": [OK, BAD, OK, OK], "lost": [BAD, BAD, BAD, OK]})
    clock = iter(range(100))
    monitor = ReadinessMonitor(provider, prober, CFG, clock=lambda: float(next(clock)))
    assert [await monitor.step() for _ in range(4)] == [[], [], ["lost"], []]
    assert provider.replaced[0][0] == "lost" and "m:default not ready" in provider.replaced[0][1]
    assert "warming" not in prober.probed                  # only ready replicas are probed
    assert prober.probed.count("lost") == 3                # draining after its third failure: not probed again
    assert set(monitor.records) == {"good"}


async def test_the_prober_asks_model_ready_for_each_variant_with_the_token(tmp_path) -> None:
    config = mesh_config(tmp_path, {"m": {"variants": {"a": {"source": sleep_model(tmp_path, "ma")},
                                                        "b": {"source": sleep_model(tmp_path, "mb")}}}},
                         security={"internal_token_env": "CMESH_TEST_INTERNAL_TOKEN"},
                         server={"model_control": "explicit"})
    async with running_server(config, ["m:a"], internal_token=TOKEN) as server:
        handle = ReplicaHandle(id="r", model="m", pool="serverless", state="ready",
                               address=f"127.0.0.1:{server.port}", variants=("a",))
        prober = ReplicaProber(MeshCredentials(token=TOKEN), timeout_s=2.0)
        assert await prober.probe(handle) == ProbeOutcome(True)
        both = ReplicaHandle(id="r", model="m", pool="serverless", state="ready",
                             address=f"127.0.0.1:{server.port}", variants=("a", "b"))
        assert await prober.probe(both) == ProbeOutcome(False, "m:b not ready")
        outsider = ReplicaProber(MeshCredentials(), timeout_s=2.0)
        outcome = await outsider.probe(handle)
        assert not outcome.ok and "UNAUTHENTICATED" in outcome.reason
        await outsider.close()
        await prober.close()
    gone = await ReplicaProber(None, timeout_s=0.5).probe(handle)      # the port is closed now
    assert not gone.ok


# ---------------------------------------------------------------- real processes

async def status(address: str) -> mesh_pb2.StatusResponse:
    async with open_internal_channel(address, MeshCredentials(token=TOKEN)) as channel:
        return await mesh_pb2_grpc.AutoscalerStub(channel).Status(mesh_pb2.StatusRequest(), timeout=5)


async def ready_replicas(address: str) -> list:
    return [r for m in (await status(address)).models for r in m.replicas if r.state == "ready"]


async def until(predicate, what: str, timeout: float = 90.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_replica_whose_model_was_unloaded_is_replaced(tmp_path) -> None:
    port = free_port()
    data = {"store": str(tmp_path / "store"),
            "server": {"drain_delay_s": 0.1, "drain_grace_s": 2, "model_control": "explicit"},
            "security": {"internal_token_env": "CMESH_TEST_INTERNAL_TOKEN"},
            "autoscaler": {"listen": f"127.0.0.1:{port}", "tick_s": 0.2, "stable_window_s": 2.0,
                           "panic_window_s": 0.6, "drain_grace_s": 2.0,
                           "readiness_probe": {"period_s": 0.2, "timeout_s": 1.0, "failure_threshold": 2}},
            "models": {"m": {"source": sleep_model(tmp_path / "store", "m", sleep_ms=1),
                             "deployment": {"mode": "serverless", "min_replicas": 1, "max_replicas": 1}}}}
    cfg = write_config(tmp_path / "mesh.yaml", data)
    env = {**os.environ, "CMESH_STATE_DIR": str(tmp_path / "state"), "CMESH_TEST_INTERNAL_TOKEN": TOKEN}
    log = tmp_path / "autoscaler.log"
    # With the fork server (the default): forked replicas get the token from its environment.
    proc, _ = spawn_service(["-m", "autoscaler", "--config", str(cfg), "--log-level", "INFO"], env=env,
                            cwd=REPO, stderr=open(log, "ab"))
    address = f"127.0.0.1:{port}"
    try:
        [first] = await until(lambda: ready_replicas(address), "the provisioned replica")
        async with grpc.aio.insecure_channel(first.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            md = ((HEADER, TOKEN),)
            with pytest.raises(grpc.aio.AioRpcError) as info:      # the replica demands the token
                await stub.ModelReady(pb.ModelReadyRequest(name="m"), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert (await stub.ModelReady(pb.ModelReadyRequest(name="m"), metadata=md, timeout=5)).ready
            await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="m"), metadata=md,
                                             timeout=5)

        async def replaced():
            ready = await ready_replicas(address)
            return ready if ready and all(r.id != first.id for r in ready) else None

        [second] = await until(replaced, "a new replica in place of the one that lost its model")
        assert second.address != first.address
        async with open_internal_channel(second.address, MeshCredentials(token=TOKEN)) as channel:
            reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelReady(pb.ModelReadyRequest(name="m"),
                                                                               timeout=5)
            assert reply.ready
        # The table routers follow has the new replica only.
        async with open_internal_channel(address, MeshCredentials(token=TOKEN)) as channel:
            watch = mesh_pb2_grpc.AutoscalerStub(channel).WatchEndpoints(mesh_pb2.WatchEndpointsRequest(),
                                                                        timeout=5)
            table = await anext(aiter(watch))
            watch.cancel()
        assert [(r.id, r.address) for m in table.models for r in m.replicas] == [(second.id, second.address)]
        text = log.read_text()
        assert f"replica {first.id} of m failed 2 readiness probes in a row" in text
    finally:
        proc.terminate()
        code = proc.wait(timeout=60)
        proc.stdout.close()
        assert code == 0, log.read_text()[-3000:]
