"""Recovery after an autoscaler restart: the router's reconnect back-off is bounded
(jittered exponential, at most 1 s, and gRPC's own channel back-off too), so
serving follows a restarted autoscaler within about a second. The back-off and
the watch loop with an injected rng and sleep, then real autoscaler processes:
connection attempts counted while it is down, and the table refreshed after."""
import asyncio
import os
import random
import signal
import socket

import grpc
import pytest

from cmesh.backoff import MAX_RECONNECT_S, Backoff
from cmesh.internal_auth import MeshCredentials, open_internal_channel
from cmesh.proc import spawn_service
from meshtest import REPO, free_port, sleep_model, write_config
from protos import mesh_pb2, mesh_pb2_grpc
from router.endpoints import AutoscalerSource, EndpointTable

TOKEN = "reconnect-test-internal-token"


def test_backoff_grows_jittered_up_to_its_ceiling_and_resets() -> None:
    b = Backoff(initial_s=0.05, max_s=1.0, jitter=0.5, rng=random.Random(7))
    delays = [b.next() for _ in range(40)]
    assert all(0 < d <= 1.0 for d in delays)
    assert delays[0] <= 0.05 and max(delays) > 0.5            # grows...
    assert all(d >= 0.5 for d in delays[10:])                 # ...and stays near the ceiling
    assert len(set(delays[10:])) > 20                         # jittered: routers do not reconnect in step
    b.reset()
    assert b.next() <= 0.05
    with pytest.raises(ValueError):
        Backoff(initial_s=2.0, max_s=1.0)


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="scripted")


class ScriptedStub:
    """WatchEndpoints answers from a script: an error, or tables then an error."""

    def __init__(self, script) -> None:
        self.script = list(script)
        self.calls: list[dict] = []

    def WatchEndpoints(self, request, **kwargs):
        self.calls.append({"known_version": request.known_version, **kwargs})
        step = self.script.pop(0)

        async def stream():
            if isinstance(step, grpc.StatusCode):
                raise rpc_error(step)
            for table in step:
                yield table
            raise rpc_error(grpc.StatusCode.UNAVAILABLE)
        return stream()


class Stop(Exception):
    pass


async def test_the_watch_loop_backs_off_at_most_a_second_and_resets_on_a_table() -> None:
    down = [grpc.StatusCode.UNAVAILABLE] * 12
    table = mesh_pb2.EndpointTable(version=5)
    table.models.add(model="m").replicas.add(id="r1", address="10.0.0.1:8001", pool="serverless", state="ready")
    stub = ScriptedStub([*down, [table], grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE])
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 15:
            raise Stop

    endpoints = EndpointTable()
    source = AutoscalerSource("127.0.0.1:1", endpoints, "r", MeshCredentials(token=TOKEN),
                              backoff=Backoff(rng=random.Random(1)), sleep=sleep, stub=stub)
    with pytest.raises(Stop):
        await source.run()
    await source.close()
    assert all(call["wait_for_ready"] is True for call in stub.calls)  # wait for the channel, do not spin
    assert all(0 < s <= MAX_RECONNECT_S for s in sleeps)
    assert sleeps[0] <= 0.05 and max(sleeps[:12]) > 0.5         # exponential from 50 ms...
    assert all(s >= 0.5 for s in sleeps[6:12])                   # ...to the (jittered) 1 s ceiling
    assert sleeps[12] <= 0.05                                  # reset by the table it received
    assert endpoints.version == 5 and [r.address for r in endpoints.replicas("m")] == ["10.0.0.1:8001"]
    assert stub.calls[13]["known_version"] == 5 and source.watches == 15


# ---------------------------------------------------------------- real processes

def start_autoscaler(cfg, state, env, log):
    proc, _ = spawn_service(["-m", "autoscaler", "--config", str(cfg), "--no-fork-server", "--log-level", "INFO"],
                            env=env, cwd=REPO, stderr=open(log, "ab"))
    return proc


def stop(proc, sig=signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    code = proc.wait(timeout=60)
    proc.stdout.close()
    return code


def kill_leftovers(state) -> list[int]:
    """SIGKILL the replicas this test's autoscalers started that still run."""
    log = state / "processes.log"
    pids = [int(line.split()[1]) for line in log.read_text().splitlines()] if log.exists() else []
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            with open(f"/proc/{pid}/cmdline") as fh:
                if str(state.parent) not in fh.read():     # the pid was reused: not ours
                    continue
            os.kill(pid, signal.SIGKILL)
            alive.append(pid)
        except (OSError, IndexError):
            continue
    return alive


async def until(predicate, what: str, timeout: float = 60.0, step: float = 0.02):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


async def count_connections(port: int, start_s: float, window_s: float) -> int:
    """Stand in for the dead autoscaler on its port: accept and drop every connection;
    count those made between ``start_s`` and ``start_s + window_s`` from now."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    counted = 0

    async def dropped(reader, writer) -> None:
        nonlocal counted
        if start_s <= loop.time() - t0 <= start_s + window_s:
            counted += 1
        writer.close()

    server = await asyncio.start_server(dropped, "127.0.0.1", port, reuse_address=True, family=socket.AF_INET)
    try:
        await asyncio.sleep(start_s + window_s)
    finally:
        server.close()
        await server.wait_closed()
    return counted


async def test_a_router_follows_a_restarted_autoscaler_within_about_a_second(tmp_path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    data = {"store": str(tmp_path / "store"), "server": {"drain_delay_s": 0.1, "drain_grace_s": 2},
            "security": {"internal_token_env": "CMESH_TEST_INTERNAL_TOKEN"},
            "autoscaler": {"listen": address, "tick_s": 0.2, "drain_grace_s": 2.0},
            "models": {"m": {"source": sleep_model(tmp_path / "store", "m", sleep_ms=1),
                             "deployment": {"mode": "serverless", "min_replicas": 1, "max_replicas": 1,
                                            "idle_timeout_s": 600}}}}
    cfg = write_config(tmp_path / "mesh.yaml", data)
    env = {**os.environ, "CMESH_STATE_DIR": str(tmp_path / "state"), "CMESH_TEST_INTERNAL_TOKEN": TOKEN}
    log = tmp_path / "autoscaler.log"
    first = start_autoscaler(cfg, tmp_path / "state", env, log)
    restarted = None
    table = EndpointTable()
    source = AutoscalerSource(address, table, "router-under-test", MeshCredentials(token=TOKEN))
    task = asyncio.create_task(source.run())
    try:
        await until(lambda: table.replicas("m"), "the first table with the provisioned replica")
        before = table.version
        watches = source.watches
        stop(first, signal.SIGKILL)                               # no goodbye: the stream just breaks
        await until(lambda: not source.connected.is_set(), "the router to notice")
        # While it is down, the router keeps trying to connect at most ~1 s apart. With
        # gRPC's default back-off (1 s x1.6 up to 120 s) a 5 s window 3.5 s into an
        # outage sees one or two attempts; bounded at 1 s it sees four or five.
        attempts = await count_connections(port, start_s=3.5, window_s=5.0)
        assert attempts >= 3, f"{attempts} connection attempts in 5 s"
        restarted = start_autoscaler(cfg, tmp_path / "state", env, log)     # same port, adopts the replica

        # A client with a fresh channel sees the restarted autoscaler's first table...
        loop = asyncio.get_running_loop()
        async with open_internal_channel(address, MeshCredentials(token=TOKEN)) as channel:
            watch = mesh_pb2_grpc.AutoscalerStub(channel).WatchEndpoints(
                mesh_pb2.WatchEndpointsRequest(), wait_for_ready=True, timeout=30)
            fresh = await anext(aiter(watch))
            fresh_at = loop.time()
            watch.cancel()
        # ...and the router, which has been failing for seconds, follows about as soon.
        await until(lambda: table.version >= fresh.version, "the router's table from the restarted autoscaler",
                    timeout=15)
        lag = loop.time() - fresh_at
        assert fresh.version > before
        assert [r.address for r in table.replicas("m")] == [r.address for m in fresh.models for r in m.replicas]
        assert lag < 3.0, f"router followed {lag:.2f}s after a fresh client"
        assert source.watches - watches <= 3                      # it waited for the channel, did not spin
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await source.close()
        if first.poll() is None:
            stop(first, signal.SIGKILL)
        code = stop(restarted) if restarted is not None else 0      # drains and stops the replica
        orphans = kill_leftovers(tmp_path / "state")                # a failure before the restart
        assert code == 0, log.read_text()[-3000:]
        assert restarted is None or not orphans
