"""Live configuration's cores without sockets: what survives an apply in the
router (queues, breakers, tokens), replica generations and re-pooling, the
controller's rolling replacement, and the autoscaler's apply/rollback/refusal."""
from __future__ import annotations

import asyncio

import pytest
import yaml

from autoscaler.config_history import ConfigHistory
from autoscaler.controller import Controller
from autoscaler.generations import generation, repool, to_retire
from autoscaler.live import LiveConfig
from autoscaler.providers.base import ReplicaHandle
from cmesh.config import parse_config
from cmesh.errors import FailedPrecondition, InvalidInput, MeshError
from router.auth import Gate, Principal
from router.ratelimit import TenantLimiter
from tests.fakes import core_config, fail, served_by
from tests.test_router_core_unit import call, make_core, reps

VARIANTS = {"m": {"variants": {"a": {"source": "store://m/1", "weight": 100},
                               "b": {"source": "store://m/2", "weight": 0}},
                  "deployment": {"max_inflight_per_replica": 1}}}


def reweighted(a: float, b: float, **deployment):
    models = yaml.safe_load(yaml.safe_dump(VARIANTS))
    models["m"]["variants"]["a"]["weight"], models["m"]["variants"]["b"]["weight"] = a, b
    models["m"]["deployment"].update(deployment)
    return core_config(models, breaker={"failure_threshold": 1, "cool_down_s": 60}, retry={"max_attempts": 1})


async def test_an_apply_keeps_queued_calls_and_open_breakers_and_reweights_new_calls():
    core, _, backends = make_core(VARIANTS, {"m": reps("r1")}, breaker={"failure_threshold": 1, "cool_down_s": 60},
                                  retry={"max_attempts": 1})
    gate = asyncio.Event()
    backends["r1"].script.append(gate)
    first = asyncio.create_task(core.infer(call(core, "q1")))
    await asyncio.sleep(0.01)
    queued = asyncio.create_task(core.infer(call(core, "q2")))     # the replica's one slot is taken: queued
    await asyncio.sleep(0.01)
    assert len(core.dispatchers["m"].queue) == 1
    dispatcher = core.dispatchers["m"]
    core.apply(reweighted(0, 100))
    assert core.dispatchers["m"] is dispatcher and len(dispatcher.queue) == 1    # the queue carried over
    gate.set()
    answers = await asyncio.gather(first, queued)
    assert [a.model_version for a in answers] == ["a", "a"]          # admitted before: the old weights
    assert (await core.infer(call(core, "q3"))).model_version == "b"   # after: the new ones
    # A breaker opened before an apply stays open after it.
    backends["r1"].script.append(fail("UNAVAILABLE"))
    with pytest.raises(MeshError):
        await core.infer(call(core, "q4"))
    core.apply(reweighted(0, 100, capacity_threshold=0.5))
    with pytest.raises(MeshError) as err:
        await core.infer(call(core, "q5"))
    assert err.value.reason == "breaker_open"
    assert core.dispatchers["m"].config.deployment.capacity_threshold == 0.5
    await core.close()


def test_rate_limit_tokens_carry_over_an_apply():
    tenants = {"acme": {"api_keys_env": "K", "rate_per_s": 1, "burst": 2}}
    config = parse_config({"models": {"m": {"source": "store://m/1"}}, "tenants": tenants})
    gate = Gate(config, TenantLimiter(config.tenants))
    gate.admit(Principal("acme"), "m", now=100.0)
    gate.admit(Principal("acme"), "m", now=100.0)
    with pytest.raises(MeshError):
        gate.admit(Principal("acme"), "m", now=100.0)          # the burst is spent
    tenants["acme"]["rate_per_s"] = 2
    gate.apply(parse_config({"models": {"m": {"source": "store://m/1"}}, "tenants": tenants}), now=100.0)
    with pytest.raises(MeshError):
        gate.admit(Principal("acme"), "m", now=100.0)          # still spent: not refilled by the apply
    gate.admit(Principal("acme"), "m", now=100.5)              # the new rate refills it


def handle(rid: str, state: str = "ready", started: float = 0.0, pool: str = "serverless",
           gen: str = "g1") -> ReplicaHandle:
    return ReplicaHandle(id=rid, model="m", pool=pool, state=state, started_at=started, generation=gen)


def test_generations_change_with_what_a_replica_loads_only():
    base = {"models": {"m": {"source": "store://m/1"}}}
    g = generation(parse_config(base), "m")
    same = {"models": {"m": {"source": "store://m/1", "deployment": {"mode": "dedicated", "dedicated_replicas": 1},
                             "price": {"replica_second": 1.0}, "latency_class": "batch"}}}
    assert generation(parse_config(same), "m") == g
    for changed in ({"source": "store://m/2"}, {"source": "store://m/1", "batching": {"max_batch_size": 2}},
                    {"source": "store://m/1", "options": {"x": 1}}, {"source": "store://m/1", "engine": "sleep"}):
        assert generation(parse_config({"models": {"m": changed}}), "m") != g, changed


def test_outgoing_replicas_retire_one_per_ready_successor():
    old = [handle("o1", started=1), handle("o2", started=2), handle("o3", state="warming", started=3)]
    assert [h.id for h in to_retire(old, incoming_ready=0, desired=2)] == ["o3"]      # never served: at once
    assert [h.id for h in to_retire(old, incoming_ready=1, desired=2)] == ["o3", "o1"]  # oldest first
    assert [h.id for h in to_retire(old, incoming_ready=2, desired=2)] == ["o3", "o1", "o2"]
    assert [h.id for h in to_retire(old, incoming_ready=0, desired=0)] == ["o3", "o1", "o2"]   # idle: all go


def test_repool_moves_running_replicas_by_mode():
    hs = [handle("a", started=2), handle("b", started=1), handle("c", state="warming", started=0)]
    auto = parse_config({"models": {"m": {"source": "s", "deployment": {"mode": "auto", "dedicated_replicas": 1}}}})
    assert repool(hs, auto.models["m"].deployment) == {"b": "dedicated", "a": "serverless", "c": "serverless"}
    dedicated = parse_config({"models": {"m": {"source": "s", "deployment": {"mode": "dedicated",
                                                                               "dedicated_replicas": 3}}}})
    assert set(repool(hs, dedicated.models["m"].deployment).values()) == {"dedicated"}


class RollingProvider:
    """Replicas in memory; the test decides when they become ready."""

    def __init__(self, config) -> None:
        self.handles: dict[str, ReplicaHandle] = {}
        self.generations = {m: generation(config, m) for m in config.scaled_models}
        self.retired: list[str] = []
        self._n = 0

    def replicas(self):
        return list(self.handles.values())

    def subscribe(self, callback):
        return None

    async def scale(self, model, pool, desired, devices):
        live = [h for h in self.handles.values() if h.model == model and h.pool == pool
                and h.state != "draining" and h.generation == self.generations.get(model)]
        for _ in range(desired - len(live)):
            self._n += 1
            rid = f"{model}-{self._n}"
            self.handles[rid] = ReplicaHandle(id=rid, model=model, pool=pool, state="warming",
                                              generation=self.generations[model], started_at=self._n)

    def apply(self, config, path, config_id):
        self.generations = {m: generation(config, m) for m in config.scaled_models}

    def outgoing(self, model):
        return [h for h in self.handles.values() if h.model == model and h.state != "draining"
                and h.generation != self.generations.get(model)]

    def retire(self, h):
        h.state = "draining"
        self.retired.append(h.id)

    def repool(self, pools):
        for rid, pool in pools.items():
            self.handles[rid].pool = pool

    async def close(self):
        return None


async def test_the_controller_rolls_a_version_switch_without_a_capacity_dip():
    spec = {"source": "store://m/1", "deployment": {"mode": "dedicated", "dedicated_replicas": 2, "max_replicas": 2}}
    config = parse_config({"store": "/nonexistent", "models": {"m": spec}})
    provider = RollingProvider(config)
    controller = Controller(config, provider)
    await controller.tick()
    for h in provider.replicas():
        h.state = "ready"
    old = {h.id for h in provider.replicas()}
    assert len(old) == 2
    new_config = parse_config({"store": "/nonexistent", "models": {"m": {**spec, "source": "store://m/2"}}})
    await controller.apply(new_config, "/tmp/x.yaml", "c2")
    await controller.tick()
    new = [h for h in provider.replicas() if h.id not in old]
    assert len(new) == 2 and provider.retired == []                  # successors start; nothing drains yet
    new[0].state = "ready"
    await controller.tick()
    assert len(provider.retired) == 1                                 # one per ready successor
    new[1].state = "ready"
    await controller.tick()
    assert sorted(provider.retired) == sorted(old)
    # A mode switch re-pools what runs; nothing restarts.
    running = {h.id for h in provider.replicas() if h.state == "ready"}
    auto = parse_config({"store": "/nonexistent", "models": {"m": {"source": "store://m/2", "deployment": {
        "mode": "auto", "dedicated_replicas": 1, "max_replicas": 2}}}})
    await controller.apply(auto, "/tmp/y.yaml", "c3")
    assert {h.id for h in provider.replicas() if h.state == "ready"} == running
    assert sorted(h.pool for h in provider.replicas() if h.state == "ready") == ["dedicated", "serverless"]


def doc(**models) -> str:
    """A config whose pipeline p uses model m."""
    return yaml.safe_dump({"store": "/nonexistent", "models": models,
                           "pipelines": {"p": {"nodes": {"a": {"model": "m"}}}}})


async def test_apply_records_refuses_whole_and_rolls_back(tmp_path):
    followed = []

    async def follow(config, path, record, text):
        followed.append((record.id, sorted(config.models)))

    text = doc(m={"source": "store://m/1"}, n={"source": "store://n/1"})
    live = LiveConfig(parse_config(yaml.safe_load(text)), ConfigHistory(tmp_path / "h"), follow)
    await live.start(text, "mesh.yaml")
    first = live.current
    assert first.source == "file" and followed == [(first.id, ["m", "n"])]
    # Refused whole, with every problem; nothing recorded or followed.
    with pytest.raises(InvalidInput) as err:
        await live.apply(doc(n={"source": "store://n/1", "batching": {"max_batch_size": 0}}), applied_by="key-1")
    assert "models.m: removed, but pipelines.p.nodes.a still uses it" in err.value.message
    assert "models.n.batching.max_batch_size: must be >= 1" in err.value.message
    assert live.current == first and len(followed) == 1
    with pytest.raises(InvalidInput, match="aliases are not allowed"):
        await live.apply("a: &x [1]\nb: *x\n", applied_by="key-1")
    # A dry run diffs only; the same config again records nothing.
    dry = await live.apply(doc(m={"source": "store://m/2"}, n={"source": "store://n/1"}), applied_by="key-1",
                           dry_run=True)
    assert not dry.applied and [c.path for c in dry.changes] == ["models.m.source"] and live.current == first
    assert not (await live.apply(text, applied_by="key-1")).applied
    applied = await live.apply(doc(m={"source": "store://m/2"}, n={"source": "store://n/1"}), applied_by="key-1")
    assert applied.applied and live.current.applied_by == "key-1" and live.config.models["m"].source == "store://m/2"
    back = await live.rollback(applied_by="key-2")
    assert back.record.source == "rollback" and live.config.models["m"].source == "store://m/1"
    assert [c.path for c in back.changes] == ["models.m.source"]
    # A restart with the same file resumes the applied history; a changed file wins.
    again = LiveConfig(parse_config(yaml.safe_load(text)), ConfigHistory(tmp_path / "h"), follow)
    await again.start(text, "mesh.yaml")
    assert again.current == back.record
    changed = doc(m={"source": "store://m/3"}, n={"source": "store://n/1"})
    third = LiveConfig(parse_config(yaml.safe_load(changed)), ConfigHistory(tmp_path / "h"), follow)
    await third.start(changed, "mesh.yaml")
    assert third.current.source == "file" and third.config.models["m"].source == "store://m/3"


async def test_rollback_without_history_is_a_failed_precondition(tmp_path):
    async def follow(config, path, record, text):
        return None

    text = doc(m={"source": "store://m/1"})
    live = LiveConfig(parse_config(yaml.safe_load(text)), ConfigHistory(tmp_path / "h"), follow)
    await live.start(text, "mesh.yaml")
    with pytest.raises(FailedPrecondition):
        await live.rollback(applied_by="key-1")


async def test_an_apply_survives_a_leader_failover_through_the_redis_mirror(tmp_path, redis_url):
    import uuid

    from autoscaler.config_mirror import RedisConfigMirror

    async def follow(config, path, record, text):
        return None

    key = f"cmesh:test:{uuid.uuid4().hex}"
    text = doc(m={"source": "store://m/1"})
    clock = iter(range(1000, 2000))

    def tick() -> float:
        return float(next(clock))

    roles = {"a": True, "b": False}
    a = LiveConfig(parse_config(yaml.safe_load(text)), ConfigHistory(tmp_path / "a", wall=tick), follow,
                   mirror=RedisConfigMirror(redis_url, key=key), leading=lambda: roles["a"])
    b = LiveConfig(parse_config(yaml.safe_load(text)), ConfigHistory(tmp_path / "b", wall=tick), follow,
                   mirror=RedisConfigMirror(redis_url, key=key), leading=lambda: roles["b"])
    await a.start(text, "mesh.yaml")
    await b.start(text, "mesh.yaml")                       # a standby: it writes no mirror
    assert (await a.adopt_mirrored()) is None              # elected first: mirrors its own config
    await a.apply(doc(m={"source": "store://m/2"}), applied_by="key-1")
    roles.update(a=False, b=True)                          # a fails over to b
    adopted = await b.adopt_mirrored()
    assert adopted is not None and adopted.applied and b.config.models["m"].source == "store://m/2"
    assert "adopted from the previous leader" in b.current.note and b.current.applied_by == "key-1"
    assert (await b.adopt_mirrored()) is None              # the same config: nothing to do
    # A file loaded after the mirrored apply is the newer intent: kept, and mirrored.
    newer = doc(m={"source": "store://m/3"})
    c = LiveConfig(parse_config(yaml.safe_load(newer)), ConfigHistory(tmp_path / "c", wall=tick), follow,
                   mirror=RedisConfigMirror(redis_url, key=key), leading=lambda: True)
    await c.start(newer, "mesh.yaml")
    assert (await c.adopt_mirrored()) is None and c.config.models["m"].source == "store://m/3"
    assert (await c.mirror.latest())["sha256"] == c.current.sha256
    for live in (a, b, c):
        await live.mirror.close()


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


async def test_the_rollout_driver_rolls_back_publishes_and_resumes_after_a_restart(tmp_path):
    from autoscaler.rollouts import RolloutDriver
    from cmesh.latency import N_BUCKETS, bucket_of
    from protos import mesh_pb2

    async def follow(config, path, record, text):
        return None

    rollout = {"canary": "b", "steps": [10, 50, 100], "interval_s": 30, "max_error_rate": 0.05, "min_requests": 10}
    model = {"variants": {"a": {"source": "store://m/1", "weight": 1}, "b": {"source": "store://m/2", "weight": 0}},
             "rollout": rollout}
    text = yaml.safe_dump({"store": "/nonexistent", "models": {"m": model}})
    live = LiveConfig(parse_config(yaml.safe_load(text)), ConfigHistory(tmp_path / "h"), follow)
    await live.start(text, "mesh.yaml")
    clock = FakeClock()
    driver = RolloutDriver(live, clock=clock, state_path=tmp_path / "rollouts.json")
    await driver.tick()
    weights = {v: s.weight for v, s in live.config.models["m"].variants.items()}
    assert weights == {"a": 90.0, "b": 10.0} and live.current.source == "rollout"

    def report(variant: str, answered: int, failed: int, ms: float) -> mesh_pb2.LoadReport:
        counts = [0] * N_BUCKETS
        counts[bucket_of(ms / 1000)] = answered - failed
        r = mesh_pb2.LoadReport(source="router-1")
        r.models.add(model="m", variant=variant, answered=answered, failed=failed, latency_counts=counts)
        return r

    # A healthy step: held for its interval, then on to 50 %.
    driver.on_report(report("a", 90, 0, 10))
    driver.on_report(report("b", 12, 0, 11))
    clock.t = 31
    await driver.tick()
    assert driver.states["m"].step == 1 and live.config.models["m"].variants["b"].weight == 50.0
    # A restart resumes at the step (fresh interval), not from the start.
    resumed = RolloutDriver(live, clock=clock, state_path=tmp_path / "rollouts.json")
    assert resumed.states["m"].step == 1 and resumed.states["m"].state == "progressing"
    # Failing answers roll it back on the next tick, well before the interval.
    clock.t = 33
    resumed.on_report(report("a", 40, 0, 10))
    resumed.on_report(report("b", 40, 20, 10))
    await resumed.tick()
    state = resumed.status("m").rollouts[0]
    assert state.state == "rolled_back" and state.weight == 0 and "error rate" in state.reason
    assert {v: s.weight for v, s in live.config.models["m"].variants.items()} == {"a": 100.0, "b": 0.0}
    assert "rolled_back" in live.current.note
    # Rolled back stays rolled back: no move on later ticks.
    before = live.current.id
    clock.t = 100
    await resumed.tick()
    assert live.current.id == before
