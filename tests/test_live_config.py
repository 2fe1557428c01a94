"""Live configuration on real processes: an autoscaler with its local provider, a
router following its stream, applies through the router's Admin service."""
import asyncio
from contextlib import asynccontextmanager

import grpc
import numpy as np
import pytest
import yaml

from cmesh.client import AsyncClient
from cmesh.config import load_config
from meshtest import free_port, running_router, sleep_model, write_config, write_version
from protos import mesh_pb2, mesh_pb2_grpc
from test_autoscaler_e2e import FAST, AutoscalerProcess, until

ADMIN_ENV = "CMESH_TEST_ADMIN_KEYS"
ADMIN_KEY = "admin-secret-1"


def x(value: float) -> dict:
    return {"x": np.full((1, 4), value, dtype=np.float32)}


def base(tmp_path, port: int) -> dict:
    store = tmp_path / "store"
    source = sleep_model(store, "m", sleep_ms=5, max_batch_size=4, max_queue_delay_ms=1)
    write_version(store, "m", "2", engine="sleep",
                  inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
                  outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
                  options={"sleep_ms": 5}, max_batch_size=4, max_queue_delay_ms=1)
    return {"store": str(store),
            "server": {"drain_delay_s": 0.2, "drain_grace_s": 5},
            "security": {"admin_keys_env": ADMIN_ENV},
            "autoscaler": {**FAST, "listen": f"127.0.0.1:{port}"},
            "router": {"autoscaler": f"127.0.0.1:{port}", "hold_timeout_s": 60},
            "models": {"m": {"source": source, "deployment": {"mode": "serverless", "min_replicas": 1,
                                                               "max_replicas": 2, "target_concurrency": 8}},
                       "n": {"source": source, "deployment": {"mode": "serverless", "min_replicas": 1}}},
            "pipelines": {"p": {"nodes": {"a": {"model": "m", "input": {"x": "request.x"}},
                                          "b": {"model": "n", "input": {"x": "a.y"}}}}}}


class Admin:
    def __init__(self, address: str, key: str = ADMIN_KEY) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = mesh_pb2_grpc.AdminStub(self.channel)
        self.md = (("authorization", f"Bearer {key}"),)

    async def apply(self, data: dict | str, **kw) -> mesh_pb2.ApplyConfigResponse:
        text = data if isinstance(data, str) else yaml.safe_dump(data)
        return await self.stub.ApplyConfig(mesh_pb2.ApplyConfigRequest(yaml=text, **kw), metadata=self.md,
                                           timeout=60)

    async def history(self) -> mesh_pb2.ConfigHistoryResponse:
        return await self.stub.ConfigHistory(mesh_pb2.ConfigHistoryRequest(), metadata=self.md, timeout=10)


@asynccontextmanager
async def live_mesh(tmp_path, data: dict):
    """The autoscaler (a process, with its local provider) and an in-process router
    following it, from ``data``; yields (scaler, router, admin, config path)."""
    cfg_path = write_config(tmp_path / "mesh.yaml", data)
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    scaler = AutoscalerProcess(cfg_path, state, int(data["autoscaler"]["listen"].rsplit(":", 1)[1]))
    try:
        async with running_router(load_config(cfg_path)) as router:
            admin = Admin(f"127.0.0.1:{router.port}")
            try:
                yield scaler, router, admin, cfg_path
            finally:
                await admin.channel.close()
    finally:
        assert scaler.stop() == 0


@pytest.fixture()
def admin_env(monkeypatch):
    monkeypatch.setenv(ADMIN_ENV, ADMIN_KEY)


async def test_apply_switches_version_and_mode_and_refuses_invalid(tmp_path, admin_env) -> None:
    port = free_port()
    data = base(tmp_path, port)
    async with live_mesh(tmp_path, data) as (scaler, router, admin, cfg_path):
        await until(lambda: _ready(scaler, "m", 1), "a first replica of m")
        first = (await admin.history()).current_id
        # An invalid config: every error, nothing changes.
        bad = yaml.safe_load(yaml.safe_dump(data))
        bad["models"]["m"]["batching"] = {"max_batch_size": 0}
        del bad["models"]["n"]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.apply(bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "models.m.batching.max_batch_size" in err.value.details()
        assert "models.n: removed, but pipelines.p.nodes.b still uses it" in err.value.details()
        assert (await admin.history()).current_id == first
        assert (await scaler.status()).config_id == first
        n_replicas = {r.id for r in await scaler.replicas("n")}
        # A version switch: first shown by the command line's dry run.
        new = yaml.safe_load(yaml.safe_dump(data))
        new["models"]["m"]["source"] = "store://m/2"
        dry = await _cli(router, "apply", str(write_config(tmp_path / "new.yaml", new)), "--dry-run")
        assert "~ models.m.source: store://m/1 -> store://m/2" in dry and "dry run" in dry, dry
        assert (await admin.history()).current_id == first
        resp = await admin.apply(new)
        assert resp.applied and resp.followed, resp
        assert any(c.kind == "version" and c.path == "models.m.source" for c in resp.changes)
        assert resp.record.applied_by.startswith("key-")
        client = AsyncClient(f"127.0.0.1:{router.port}", metadata=[("authorization", f"Bearer {ADMIN_KEY}")])

        async def on_new() -> bool:
            answer = await client.infer("m", x(1), timeout=30)
            return answer.parameters.get("cmesh-source") == "store://m/2"
        await until(on_new, "answers from version 2", timeout=60)
        await until(lambda: _no_outgoing(scaler, "m"), "the old generation drained")
        assert {r.id for r in await scaler.replicas("n")} == n_replicas   # unchanged models keep theirs
        # A mode switch re-pools without a restart.
        ids = {r.id for r in await scaler.replicas("m")}
        new["models"]["m"]["deployment"] = {"mode": "dedicated", "dedicated_replicas": len(ids),
                                            "max_replicas": 2}
        resp = await admin.apply(new)
        assert [c.kind for c in resp.changes if c.path.endswith("mode")] == ["mode"]
        ready = await scaler.replicas("m")
        assert {r.id for r in ready} == ids and {r.pool for r in ready} == {"dedicated"}
        history = await _cli(router, "config", "history")
        assert history.count("\n") >= 4 and "apply" in history and "file" in history, history
        await client.close()


async def _cli(router, *argv: str) -> str:
    """The command line against the router, as an operator runs it."""
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cmesh.cli", *argv, "--router", f"127.0.0.1:{router.port}", "--admin-key",
        ADMIN_KEY, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()
    return out.decode()


async def _ready(scaler, model: str, n: int) -> bool:
    return len(await scaler.replicas(model)) >= n


async def _no_outgoing(scaler, model: str) -> bool:
    status = await scaler.status()
    return not any(r.outgoing for m in status.models if m.model == model for r in m.replicas)


@pytest.mark.parametrize("bad", [{"fail": True}, {"sleep_ms": 80}], ids=["failing", "slow"])
async def test_a_bad_canary_is_rolled_back_by_itself_within_one_interval(tmp_path, admin_env, bad) -> None:
    port = free_port()
    data = base(tmp_path, port)
    source = "store://m/1"
    data["pipelines"] = {}
    data["models"] = {"c": {"variants": {"a": {"source": source, "weight": 100},
                                         "b": {"source": source, "weight": 0, "options": bad}},
                            "deployment": {"mode": "serverless", "min_replicas": 1, "max_replicas": 1}}}
    interval_s = 8.0
    async with live_mesh(tmp_path, data) as (scaler, router, admin, _):
        await until(lambda: _ready(scaler, "c", 1), "a replica of c")
        client = AsyncClient(f"127.0.0.1:{router.port}", metadata=[("authorization", f"Bearer {ADMIN_KEY}")])
        outcomes: dict[str, list[bool]] = {"a": [], "b": []}
        stop = asyncio.Event()

        async def load() -> None:
            while not stop.is_set():
                try:
                    answer = await client.infer("c", x(1), timeout=10)
                    outcomes[answer.model_version].append(True)
                except grpc.aio.AioRpcError as exc:
                    component = exc.details() or ""
                    outcomes["b" if "c:b" in component or "configured to fail" in component
                             else "a"].append(False)
        workers = [asyncio.create_task(load()) for _ in range(4)]
        rollout = {"canary": "b", "steps": [30, 60, 100], "interval_s": interval_s, "max_error_rate": 0.05,
                   "max_p95_ratio": 2.0, "min_requests": 10}
        new = yaml.safe_load(yaml.safe_dump(data))
        new["models"]["c"]["rollout"] = rollout
        resp = await admin.apply(new)
        assert resp.applied and [c.kind for c in resp.changes] == ["rollout"]
        started = asyncio.get_running_loop().time()

        async def rolled_back():
            status = await admin.stub.RolloutStatus(mesh_pb2.RolloutStatusRequest(model="c"),
                                                    metadata=admin.md, timeout=5)
            return status.rollouts and status.rollouts[0].state == "rolled_back" and status.rollouts[0]
        state_ = await until(rolled_back, "the canary rolled back", timeout=4 * interval_s)
        took = asyncio.get_running_loop().time() - started
        assert took < interval_s + 3.0, f"rolled back after {took:.1f} s"       # within one interval (+ reports)
        assert state_.weight == 0 and state_.canary_figures.answered >= 10, state_
        assert ("error rate" in state_.reason) if "fail" in bad else ("p95" in state_.reason), state_.reason
        # Routers follow the rollback: new calls all go to the baseline.
        await until(lambda: _follows(router, admin), "the router on the rollback config")
        await asyncio.sleep(0.5)                               # calls already sent to b finish
        b_before = len(outcomes["b"])
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*workers)
        assert len(outcomes["b"]) == b_before                  # no more canary traffic
        assert outcomes["a"] and all(outcomes["a"])            # the baseline's requests were unaffected
        assert outcomes["b"], "the canary took some traffic before it was judged"
        history = await admin.history()
        assert [r.source for r in history.records[:2]] == ["rollout", "rollout"]
        assert "rolled_back" in history.records[0].note
        await client.close()


async def _follows(router, admin) -> bool:
    return router.follower.config_id == (await admin.history()).current_id


async def test_sighup_reloads_the_file_in_the_autoscaler_and_in_a_static_router(tmp_path, admin_env) -> None:
    import os
    import signal

    from cmesh.proc import spawn_service
    from meshtest import REPO
    from protos import inference_pb2 as pb
    from protos import inference_pb2_grpc as pb_grpc

    port = free_port()
    data = base(tmp_path, port)
    async with live_mesh(tmp_path, data) as (scaler, router, admin, cfg_path):
        data["models"]["n"]["deployment"]["max_replicas"] = 3
        write_config(cfg_path, data)
        scaler.proc.send_signal(signal.SIGHUP)

        async def reloaded():
            history = await admin.history()
            return history.records[0].source == "sighup" and history
        history = await until(reloaded, "the autoscaler's SIGHUP reload")
        assert history.records[0].applied_by == "sighup"
        await until(lambda: _follows(router, admin), "the router following it")
        assert router.config.models["n"].deployment.max_replicas == 3
        # A router's own SIGHUP sends its file to the autoscaler, as an apply.
        data["models"]["n"]["deployment"]["max_replicas"] = 4
        write_config(cfg_path, data)
        await router.reload_file(str(cfg_path))
        latest = (await admin.history()).records[0]
        assert latest.source == "sighup" and latest.applied_by == f"sighup:{router.router_id}"
        await until(lambda: _follows(router, admin), "the router following its own reload")
        assert router.config.models["n"].deployment.max_replicas == 4
    # A router with static endpoints has nobody to follow: SIGHUP reloads its own file.
    static = {"models": {"m": {"source": "store://m/1", "endpoints": ["127.0.0.1:9"]}}}
    path = write_config(tmp_path / "static.yaml", static)
    proc, ready = spawn_service(["-m", "router", "--config", str(path), "--port", "0"], cwd=REPO,
                                env=dict(os.environ))
    try:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{ready['port']}")
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert not (await stub.ModelReady(pb.ModelReadyRequest(name="n"), timeout=5)).ready
        static["models"]["n"] = {"source": "store://m/1", "endpoints": ["127.0.0.1:9"]}
        write_config(path, static)
        proc.send_signal(signal.SIGHUP)

        async def ready_n():
            return (await stub.ModelReady(pb.ModelReadyRequest(name="n"), timeout=5)).ready
        await until(ready_n, "the static router's SIGHUP reload")
        await channel.close()
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
