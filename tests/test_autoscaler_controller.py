"""The control loop on a fake provider and a fake clock: per-model vs uniform strategy."""
import asyncio

from autoscaler.controller import Controller
from autoscaler.providers.base import ReplicaHandle
from cmesh.config import MeshConfig
from protos import mesh_pb2


class FakeProvider:
    """Replicas become ready the moment they are asked for."""

    def __init__(self) -> None:
        self.handles: list[ReplicaHandle] = []
        self.callbacks = []

    def replicas(self) -> list[ReplicaHandle]:
        return list(self.handles)

    async def scale(self, model: str, pool: str, desired: int, devices: list[str]) -> None:
        mine = [h for h in self.handles if h.model == model and h.pool == pool]
        for i in range(len(mine), desired):
            self.handles.append(ReplicaHandle(id=f"{model}-{pool}-{i}", model=model, pool=pool, state="ready",
                                              address=f"127.0.0.1:{9000 + len(self.handles)}"))
        for h in mine[desired:]:
            self.handles.remove(h)
        for cb in self.callbacks:
            cb()

    def subscribe(self, callback) -> None:
        self.callbacks.append(callback)

    async def close(self) -> None:
        self.handles.clear()

    def count(self, model: str) -> int:
        return sum(h.model == model for h in self.handles)


def config(strategy: str) -> MeshConfig:
    spec = {"engine": "identity", "deployment": {"mode": "serverless", "max_replicas": 10,
                                                 "target_concurrency": 4, "idle_timeout_s": 300}}
    return MeshConfig.model_validate({
        "store": "/nonexistent", "autoscaler": {"strategy": strategy, "stable_window_s": 10, "panic_window_s": 2},
        "models": {"hot": {"source": "store://x/1", **spec}, "cold": {"source": "store://y/1", **spec}}})


def report(hot: float, cold: float) -> mesh_pb2.LoadReport:
    return mesh_pb2.LoadReport(source="r1", models=[
        mesh_pb2.ModelLoad(model="hot", in_flight=int(hot), arrivals=int(hot)),
        mesh_pb2.ModelLoad(model="cold", in_flight=int(cold), arrivals=int(cold))])


def drive(strategy: str) -> dict[str, int]:
    async def go() -> dict[str, int]:
        clock = [100.0]
        provider = FakeProvider()
        ctl = Controller(config(strategy), provider, clock=lambda: clock[0], wall=lambda: 1.7e9)
        for _ in range(10):               # 10 s of 24 in flight on one model, 1 on the other
            ctl.on_report(report(24, 1))
            await ctl.tick()
            clock[0] += 1.0
        return {m: provider.count(m) for m in ("hot", "cold")}

    return asyncio.run(go())


def test_per_model_scales_each_model_on_its_own_load() -> None:
    assert drive("per-model") == {"hot": 6, "cold": 1}          # 24 / 4 and 1 / 4


def test_uniform_scales_every_model_on_the_aggregate() -> None:
    # (24 + 1) in flight over a default target of 4 + 4 per replica -> 4 of each.
    assert drive("uniform") == {"hot": 4, "cold": 4}
