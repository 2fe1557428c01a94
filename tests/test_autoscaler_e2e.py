"""The autoscaler on real processes: its local provider starts model-server
replicas, the router follows its endpoint stream. Timing-only (sleep) models."""
import asyncio
import os
import signal

import grpc
import numpy as np
import pytest

from cmesh.client import AsyncClient
from cmesh.config import load_config
from cmesh.proc import spawn_service
from meshtest import REPO, free_port, running_router, sleep_model, write_config
from protos import mesh_pb2, mesh_pb2_grpc

FAST = {"tick_s": 0.2, "stable_window_s": 2.0, "panic_window_s": 0.6, "stale_after_s": 3.0,
        "drain_grace_s": 5.0}


def x(value: float) -> dict:
    return {"x": np.full((1, 4), value, dtype=np.float32)}


class AutoscalerProcess:
    def __init__(self, cfg_path, state_dir, port: int) -> None:
        env = {**os.environ, "CMESH_STATE_DIR": str(state_dir)}
        log = state_dir / "autoscaler.log"
        try:
            self.proc, _ = spawn_service(["-m", "autoscaler", "--config", str(cfg_path), "--listen",
                                          f"127.0.0.1:{port}", "--log-level", "INFO"],
                                         env=env, cwd=REPO, stderr=open(log, "ab"))
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{log.read_text()[-3000:]}") from None
        self.address = f"127.0.0.1:{port}"

    async def status(self) -> mesh_pb2.StatusResponse:
        async with grpc.aio.insecure_channel(self.address) as channel:
            return await mesh_pb2_grpc.AutoscalerStub(channel).Status(mesh_pb2.StatusRequest(), timeout=5)

    async def replicas(self, model: str, state: str = "ready") -> list:
        status = await self.status()
        return [r for m in status.models if m.model == model for r in m.replicas if r.state == state]

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.proc.stdout.close()


async def until(predicate, what: str, timeout: float = 60.0, step: float = 0.1):
    """Wait for an observable condition of the system under test (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


def live_pids(state_dir) -> list[int]:
    """Processes the local provider started (replicas and its fork server) that still run."""
    log = state_dir / "processes.log"
    pids = [int(line.split()[1]) for line in log.read_text().splitlines()] if log.exists() else []
    assert pids, "the provider recorded no process at all"
    return [pid for pid in pids if _running(pid)]


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture()
def mesh(tmp_path):
    """A config with one serverless sleep model, written where replicas can read it."""
    def make(deployment: dict, autoscaler: dict | None = None, sleep_ms: float = 20):
        source = sleep_model(tmp_path / "store", "m", sleep_ms=sleep_ms, max_batch_size=4, max_queue_delay_ms=1)
        port = free_port()
        data = {"store": str(tmp_path / "store"),
                "server": {"drain_delay_s": 0.2, "drain_grace_s": 5},
                "autoscaler": {**FAST, **(autoscaler or {}), "listen": f"127.0.0.1:{port}"},
                "router": {"autoscaler": f"127.0.0.1:{port}", "hold_timeout_s": 60},
                "models": {"m": {"source": source, "deployment": deployment}}}
        cfg_path = write_config(tmp_path / "mesh.yaml", data)
        state = tmp_path / "state"
        state.mkdir(exist_ok=True)
        return cfg_path, state, port
    return make


async def test_scale_to_zero_after_idle_and_back_on_demand_with_no_request_lost(mesh) -> None:
    cfg_path, state, port = mesh({"mode": "serverless", "max_replicas": 2, "target_concurrency": 4,
                                  "idle_timeout_s": 2.0})
    scaler = AutoscalerProcess(cfg_path, state, port)
    try:
        assert await scaler.replicas("m") == []                   # starts at zero
        async with running_router(load_config(cfg_path)) as router:
            client = AsyncClient(f"127.0.0.1:{router.port}")
            first = await asyncio.gather(*(client.infer("m", x(i), timeout=60) for i in range(5)))
            assert [r.outputs["y"][0, 0] for r in first] == [0, 1, 2, 3, 4]     # held, then released
            assert len(await scaler.replicas("m")) == 1
            await until(lambda: _none_left(scaler, "m"), "scale to zero after the idle timeout")
            again = await asyncio.gather(*(client.infer("m", x(i), timeout=60) for i in range(5, 10)))
            assert [r.outputs["y"][0, 0] for r in again] == [5, 6, 7, 8, 9]
            await client.close()
            assert router.metrics.value("cmesh_router_cold_start_waits_total", model="m") == 2
    finally:
        assert scaler.stop() == 0
    assert live_pids(state) == []                                 # a clean exit orphans nothing


async def _none_left(scaler, model):
    status = await scaler.status()
    return all(not m.replicas for m in status.models if m.model == model)


async def test_scale_up_under_load_then_down_during_steady_traffic_losing_nothing(mesh) -> None:
    cfg_path, state, port = mesh({"mode": "serverless", "min_replicas": 1, "max_replicas": 3,
                                  "target_concurrency": 2, "idle_timeout_s": 30,
                                  "max_inflight_per_replica": 4}, sleep_ms=60)
    scaler = AutoscalerProcess(cfg_path, state, port)
    try:
        await until(lambda: scaler.replicas("m"), "the provisioned replica")
        async with running_router(load_config(cfg_path)) as router:
            client = AsyncClient(f"127.0.0.1:{router.port}")
            results: list = []
            burst = True

            async def worker(k: int) -> None:
                i = 0
                while burst or (k < 2 and i < 220):      # heavy phase, then 2 workers keep a steady trickle
                    try:
                        r = await client.infer("m", x(k * 1000 + i), timeout=60)
                        results.append(bool(r.outputs["y"][0, 0] == k * 1000 + i))
                    except grpc.aio.AioRpcError as exc:
                        results.append(exc)
                    i += 1
                    if not burst:
                        await asyncio.sleep(0.02)

            workers = [asyncio.create_task(worker(k)) for k in range(12)]
            peak = await until(lambda: _at_least(scaler, "m", 2), "scale-up under load")
            burst = False                                  # load drops: the policy scales down
            await until(lambda: _at_most(scaler, "m", 1), "scale-down during steady traffic", timeout=90)
            await asyncio.gather(*workers)
            await client.close()
        errors = [r for r in results if r is not True]
        assert not errors, errors[:3]
        assert len(results) >= 400
        assert peak >= 2
    finally:
        assert scaler.stop() == 0


async def _at_least(scaler, model, n):
    ready = await scaler.replicas(model)
    return len(ready) if len(ready) >= n else 0


async def _at_most(scaler, model, n):
    status = await scaler.status()
    reps = [r for m in status.models if m.model == model for r in m.replicas]
    return len(reps) <= n and all(r.state == "ready" for r in reps)


async def test_killed_autoscaler_leaves_serving_uninterrupted_and_a_restart_adopts_replicas(mesh) -> None:
    cfg_path, state, port = mesh({"mode": "serverless", "min_replicas": 1, "max_replicas": 2,
                                  "target_concurrency": 8, "idle_timeout_s": 60})
    scaler = AutoscalerProcess(cfg_path, state, port)
    restarted = None
    try:
        before = await until(lambda: scaler.replicas("m"), "the provisioned replica")
        async with running_router(load_config(cfg_path)) as router:
            client = AsyncClient(f"127.0.0.1:{router.port}")
            outcomes: list = []
            running = True

            async def traffic() -> None:
                i = 0
                while running:
                    try:
                        await client.infer("m", x(i), timeout=30)
                        outcomes.append(True)
                    except grpc.aio.AioRpcError as exc:
                        outcomes.append(exc)
                    i += 1
                    await asyncio.sleep(0.01)

            task = asyncio.create_task(traffic())
            await until(lambda: _count(outcomes, 50), "traffic before the kill")
            scaler.stop(signal.SIGKILL)                  # no clean-up at all
            n = len(outcomes)
            await until(lambda: _count(outcomes, n + 100), "traffic with no autoscaler")
            restarted = AutoscalerProcess(cfg_path, state, port)
            after = await until(lambda: restarted.replicas("m"), "adopted replicas")
            n = len(outcomes)
            await until(lambda: _count(outcomes, n + 100), "traffic after the restart")
            running = False
            await task
            await client.close()
        assert all(o is True for o in outcomes), [o for o in outcomes if o is not True][:3]
        assert {r.id for r in after} == {r.id for r in before}        # adopted, not restarted
    finally:
        if restarted is not None:
            assert restarted.stop() == 0
        scaler.stop(signal.SIGKILL)
    assert live_pids(state) == []


async def _count(outcomes, n):
    return len(outcomes) >= n
