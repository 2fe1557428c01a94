"""The simulator's fast paths give the answers of the plain ones."""
import math

import numpy as np
import pytest

from cmesh.config import load_config
from router.dispatch import ReplicaView, choose, has_any_replica
from sim.events import EventLoop
from sim.mesh import SimOptions, simulate
from sim.profiles import parse_profiles
from sim.stats import Histogram, IntervalP95
from sim.workload import Stream, Workload
from tests.test_sim_core import FAST, MESH


def test_feed_merges_with_the_heap_in_time_order_heap_first_on_ties() -> None:
    loop = EventLoop()
    seen = []
    loop.at(1.0, seen.append, "h1")
    loop.at(2.0, seen.append, "h2")
    loop.feed([0.5, 1.0, 3.0], lambda i: seen.append(f"f{i}"))
    loop.run(2.5)
    assert seen == ["f0", "h1", "f1", "h2"] and loop.now == 2.5 and len(loop) == 1
    loop.run(10.0)
    assert seen[-1] == "f2" and loop.events == 5


def _one_call(network_ms: float) -> float:
    profiles = parse_profiles({**FAST, "host": {"network_ms": network_ms}})
    wl = Workload("one", 1.0, [Stream("e", "model", "embedder", "interactive", np.asarray([0.0]),
                                      np.asarray([0]), ("hi",))])
    r = simulate(load_config(MESH), profiles, wl, SimOptions())
    return r.by_target["model:embedder|interactive"]["mean_ms"]


def test_network_time_is_paid_once_per_call() -> None:
    # One call on a warm replica: its batch latency (20 ms at 1) plus the network.
    assert _one_call(0.0) == pytest.approx(20.0, rel=0.011)
    assert _one_call(7.0) == pytest.approx(27.0, rel=0.011)


def test_cached_choice_is_the_production_choice() -> None:
    from sim.router import SimRouter

    class R:
        def __init__(self, rid, pool, n):
            self.id, self.pool, self.in_flight, self.views = rid, pool, n, {}

    ms = type("M", (), {"cap": 4, "mode": "serverless", "threshold": 0.8})()
    for n in range(5):
        v, c, any_ready = SimRouter._view(None, R("r1", "serverless", n), ms)
        assert c == choose([v], "serverless", 0.8) and any_ready == has_any_replica([v], "serverless")
        assert (c is None) == (n >= 4)


def test_buffered_histograms_match_direct_binning() -> None:
    rng = np.random.default_rng(2)
    xs = rng.lognormal(2, 1.5, 5000).tolist() + [0.0, 1e-4]
    h = Histogram()
    for x in xs:
        h.add(x)
    direct: dict[int, int] = {}
    inv = 1 / math.log(1.01)
    for x in xs:
        k = int(math.log(x) * inv) if x > 1e-3 else -700
        direct[k] = direct.get(k, 0) + 1
    assert h.counts == direct and h.n == len(xs) and h.total == pytest.approx(sum(xs))


def test_failed_requests_make_an_interval_a_breach_not_a_gap() -> None:
    iv = IntervalP95(10.0)
    for i in range(20):
        iv.add(1.0, 100.0)          # interval 0: all fine
        iv.add(11.0, 100.0)         # interval 1: fine but 10 of 30 failed
    for _ in range(10):
        iv.fail(12.0)
        iv.fail(25.0)               # interval 2: only failures
    p95 = iv.p95s()
    assert p95[0] == pytest.approx(100.0, rel=0.05) and p95[1] == math.inf and p95[2] == math.inf
    assert iv.within(100.0) == pytest.approx(1 / 3)
    assert iv.within(100.0, start_s=10.0) == 0.0
    assert iv.merged(start_s=0.0, end_s=10.0).n == 20
