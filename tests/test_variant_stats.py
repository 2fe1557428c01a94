"""A router's per model:variant answers, failures and latencies
(router/variant_stats.py): what counts, the memory bound, metering feeding it, and
the load report carrying it to the autoscaler, whose scaling ignores it. Fakes
only: no sockets (the reporter's stub is never called)."""
from __future__ import annotations

import numpy as np
import pytest

from autoscaler.controller import Controller
from autoscaler.reports import validate_report
from cmesh.client import build_request
from cmesh.errors import MeshError
from cmesh.latency import N_BUCKETS, bucket_of
from meshtest import IdleProvider
from protos import mesh_pb2
from router.auth import Principal
from router.call import Call
from router.load_report import LoadReporter
from router.metering import MemoryMeter
from router.metrics import RouterMetrics
from router.stages import Metering
from router.variant_stats import VariantStats, Window
from tests.fakes import FakeClock, fail
from tests.test_router_core_unit import make_core, reps

AB = {"m": {"variants": {"a": {"source": "store://m/1", "weight": 1}, "b": {"source": "store://m/2", "weight": 1}}},
      "n": {"source": "store://n/1"}}


def test_what_counts_follows_the_breaker() -> None:
    stats = VariantStats()
    stats.observe("m", "a", "OK", 0.010)
    stats.observe("m", "a", "OK", 0.010)
    stats.observe("m", "a", "OK", 3.0)
    stats.observe("m", "a", "UNAVAILABLE", 0.001)          # the component's fault
    stats.observe("m", "a", "DEADLINE_EXCEEDED", 5.0)
    stats.observe("m", "a", "INVALID_ARGUMENT", 0.002)     # the caller's: answered, not failed
    stats.observe("m", "a", "RESOURCE_EXHAUSTED", 0.002)   # overload: neutral
    stats.observe("m", "a", "CANCELLED", 0.5)              # the caller left: not counted at all
    stats.observe("m", "b", "CANCELLED", 0.5)
    taken = stats.take()
    assert list(taken) == [("m", "a")]                     # no key for a variant with only CANCELLED calls
    window = taken[("m", "a")]
    assert (window.answered, window.failed) == (7, 2)
    assert len(window.counts) == N_BUCKETS and sum(window.counts) == 3     # only OK answers are timed
    assert window.counts[bucket_of(0.010)] == 2 and window.counts[bucket_of(3.0)] == 1
    assert stats.take() == {}                              # taken means reset


def test_keys_are_bounded_and_the_overflow_is_counted() -> None:
    stats = VariantStats(max_keys=2)
    for variant in ("a", "b", "c", "d"):
        stats.observe("m", variant, "OK", 0.01)
    stats.observe("m", "a", "OK", 0.01)                    # a known key still counts
    assert stats.dropped == 2
    assert stats.take() == {("m", "a"): Window(2, 0, stats_counts(0.01, 2)),
                            ("m", "b"): Window(1, 0, stats_counts(0.01, 1))}
    stats.observe("m", "c", "OK", 0.01)                    # a new period has room again
    assert list(stats.take()) == [("m", "c")]


def stats_counts(seconds: float, n: int) -> list[int]:
    counts = [0] * N_BUCKETS
    counts[bucket_of(seconds)] = n
    return counts


def call(model: str = "m", **kw) -> Call:
    return Call(principal=Principal("acme"), model=model,
                request=build_request(model, {"x": np.ones((1, 4), dtype=np.float32)}), deadline=10.0, **kw)


async def test_metering_counts_calls_that_reached_a_variant() -> None:
    clock = FakeClock(100.0)
    stats = VariantStats()
    metering = Metering(MemoryMeter(), RouterMetrics(), clock, lambda: 1.7e9, stats)
    assert isinstance(Metering(MemoryMeter(), RouterMetrics(), clock, lambda: 1.7e9).stats, VariantStats)
    c = call(request_id="r1")
    c.accounting.variant = "a"
    clock.advance(0.25)
    metering.record(c, "OK", 100.0)
    metering.record(call(request_id="r2"), "NOT_FOUND", 100.0)     # refused before a variant was drawn
    await metering.flush()
    metering.close()
    taken = stats.take()
    assert list(taken) == [("m", "a")]
    assert taken[("m", "a")].counts[bucket_of(0.25)] == 1


class NoChannel:
    """Enough of a grpc.aio.Channel to build the reporter's stub; snapshot() never calls it."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


async def test_load_reports_carry_per_variant_figures_beside_the_model_entries() -> None:
    core, _, backends = make_core(AB, {"m": reps("r1"), "n": reps("r2")}, retry={"max_attempts": 1})
    reporter = LoadReporter(core, NoChannel(), source="router-1", wall=lambda: 1.7e9)
    for version in ("a", "a", "b"):
        await core.infer(call(version=version, request_id=f"ok-{version}"))
    backends["r1"].script.append(fail("INTERNAL"))
    with pytest.raises(MeshError):
        await core.infer(call(version="b"))
    with pytest.raises(MeshError, match="no variant"):
        await core.infer(call(version="zz"))                   # no variant drawn: not in the figures
    await core.infer(call("n"))

    report = reporter.snapshot()
    plain = [load for load in report.models if not load.variant]
    assert [(load.model, load.arrivals, load.answered, len(load.latency_counts)) for load in plain] == \
           [("m", 5, 0, 0), ("n", 1, 0, 0)]                    # the scaling entries, as before
    per_variant = {(load.model, load.variant): load for load in report.models if load.variant}
    assert sorted(per_variant) == [("m", "a"), ("m", "b"), ("n", "default")]
    a, b = per_variant[("m", "a")], per_variant[("m", "b")]
    assert (a.answered, a.failed, sum(a.latency_counts)) == (2, 0, 2)
    assert (b.answered, b.failed, sum(b.latency_counts)) == (2, 1, 1)
    assert len(a.latency_counts) == N_BUCKETS
    assert (a.queue_depth, a.in_flight, a.arrivals, a.ready) == (0, 0, 0, True)
    validate_report(report, core.config.models)                # the autoscaler accepts it

    clock = FakeClock()
    controller = Controller(core.config, IdleProvider(), clock=clock)
    controller.on_report(report)
    assert controller.window.arrivals("m", clock(), 10) == 5

    again = reporter.snapshot()
    assert all(not load.variant for load in again.models)      # taken: the next report starts afresh
    await core.close()


def test_scaling_reads_only_the_entries_without_a_variant() -> None:
    clock = FakeClock()
    controller = Controller(make_core(AB, {})[0].config, IdleProvider(), clock=clock)
    report = mesh_pb2.LoadReport(source="router-1", models=[
        mesh_pb2.ModelLoad(model="m", in_flight=3, arrivals=5, ready=True),
        mesh_pb2.ModelLoad(model="m", variant="a", in_flight=7, arrivals=11, answered=4, ready=True)])
    controller.on_report(report)
    assert controller.window.concurrency("m", clock()) == 3 and controller.window.arrivals("m", clock(), 10) == 5
