"""The router core's stages one at a time (router/stages.py): admission, the A/B
variant, the breaker gate and metering, with no core, socket or backend."""
from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from cmesh.client import build_request
from cmesh.errors import InvalidInput, NotFound, Unavailable
from router.auth import Principal
from router.breaker import BreakerRegistry
from router.call import Call
from router.metering import MemoryMeter
from router.metrics import RouterMetrics
from router.stages import Admission, Breakers, Metering, Variants
from tests.fakes import FakeClock, core_config

AB = {"m": {"variants": {"a": {"source": "store://m/1", "weight": 3}, "b": {"source": "store://m/2", "weight": 1}},
            "latency_class": "batch"}}


def call(model: str = "m", **kw) -> Call:
    return Call(principal=Principal("acme"), model=model,
                request=build_request(model, {"x": np.ones((1, 4), dtype=np.float32)}), deadline=10.0, **kw)


def test_admission_fills_defaults_counts_arrivals_and_checks_shapes() -> None:
    admission = Admission(core_config(AB))
    c = call()
    admission.model(c)
    assert c.latency_class == "batch" and c.request_id          # the model's class, a fresh id
    assert admission.check(c) == [4]
    kept = call(request_id="mine", latency_class="interactive")
    admission.model(kept)
    assert (kept.request_id, kept.latency_class) == ("mine", "interactive")
    assert admission.take_arrivals() == {"m": 2} and admission.take_arrivals() == {}
    with pytest.raises(NotFound, match="unknown model"):
        admission.model(call("nope"))
    bad = call()
    del bad.request.inputs[0].shape[:]
    bad.request.inputs[0].shape.extend([1, 5])                  # 5 floats declared, 4 present
    with pytest.raises(InvalidInput):
        admission.check(bad)


def test_variants_by_weight_pinned_and_sticky() -> None:
    variants = Variants(core_config(AB), random.Random(0))
    drawn = [variants.pick(call()) for _ in range(4000)]
    assert 0.70 < drawn.count("a") / 4000 < 0.80                # weights 3:1
    pinned = call(version="b")
    assert variants.pick(pinned) == "b" and pinned.accounting.variant == "b"
    assert len({variants.pick(call(session="s-1")) for _ in range(50)}) == 1
    with pytest.raises(NotFound, match="no variant 'c'"):
        variants.pick(call(version="c"))


def test_breaker_gate_opens_on_backend_failures_only() -> None:
    clock = FakeClock()
    config = core_config(AB, breaker={"failure_threshold": 2, "cool_down_s": 5})
    gate = Breakers(BreakerRegistry(config.router.breaker), RouterMetrics(), clock)
    for _ in range(5):                            # the router's own errors: released unjudged
        gate.verdict(gate.enter("m:a", call()), "m:a", None)
    for _ in range(2):
        gate.verdict(gate.enter("m:a", call()), "m:a", "UNAVAILABLE")
    with pytest.raises(Unavailable, match="circuit breaker") as err:
        gate.enter("m:a", call())
    assert err.value.reason == "breaker_open" and err.value.retry_after_ms > 0
    gate.verdict(gate.enter("m:b", call()), "m:b", "OK")          # another component is unaffected
    clock.advance(6)
    gate.verdict(gate.enter("m:a", call()), "m:a", "OK")          # the half-open probe closes it
    gate.enter("m:a", call())


async def test_metering_records_each_call_once_from_its_accounting() -> None:
    meter = MemoryMeter()
    metering = Metering(meter, RouterMetrics(), FakeClock(), lambda: 1.7e9)
    c = call(request_id="r1", pipeline="p", latency_class="interactive")
    c.accounting.variant, c.accounting.compute_ms, c.accounting.output_tokens = "a", 250.0, 7
    metering.record(c, "OK", 0.0)
    metering.record(call(request_id="r1", latency_class="interactive"), "OK", 0.0)    # a client's retry
    await metering.flush()
    (row,) = await meter.rows()
    assert (row.model, row.variant, row.pipeline, row.requests, row.output_tokens) == ("m", "a", "p", 1, 7)
    assert row.compute_ns == 250_000_000
    metering.close()
    await asyncio.sleep(0)
