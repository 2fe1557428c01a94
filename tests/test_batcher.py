"""The dynamic batcher over a real engine thread (sleep engine; timing only)."""
import asyncio

import numpy as np
import pytest

from cmesh.errors import Draining, ResourceExhausted
from cmesh.manifest import Manifest
from model_server.batching import BatchPolicy, DynamicBatcher
from model_server.engines.base import EngineContext
from model_server.engines.testing import SleepEngine
from model_server.metrics import ServerMetrics

MANIFEST = Manifest(name="s", version="1", engine="sleep",
                    inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
                    outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, 4]}])


def make_batcher(sleep_ms=20.0, max_batch=8, delay_ms=5.0, queue=64):
    engine = SleepEngine(EngineContext(model="s", variant="default", model_dir=None, manifest=MANIFEST,
                                       options={"sleep_ms": sleep_ms}, max_batch_size=max_batch))
    engine.load()
    metrics = ServerMetrics()
    batcher = DynamicBatcher(engine, BatchPolicy(max_batch, delay_ms / 1000), max_queue_size=queue,
                             metrics=metrics.model("s", "default"))
    return engine, batcher, metrics


def item(engine, value: float, rows: int = 1, **params):
    return engine.prepare({"x": np.full((rows, 4), value, dtype=np.float32)}, params)


def batch_count(metrics) -> float:
    return metrics.registry.get_sample_value("cmesh_model_batch_size_count", {"model": "s", "variant": "default"})


async def test_concurrent_requests_share_batches_and_get_their_own_rows() -> None:
    engine, batcher, metrics = make_batcher()
    await batcher.start()
    done = await asyncio.gather(*(batcher.infer(item(engine, i)) for i in range(16)))
    await batcher.stop()
    for i, completion in enumerate(done):
        assert completion.result.error is None
        assert completion.result.outputs["y"].tolist() == [[float(i)] * 4]
    assert max(max(c.batch_sizes) for c in done) > 1
    assert batch_count(metrics) < 16
    # Compute time is shared out by rows: the shares of one batch add up to it.
    assert all(0 < c.compute_s <= 1.0 for c in done)


async def test_poisoned_request_fails_alone_and_neighbours_get_solo_results() -> None:
    engine, batcher, _ = make_batcher(sleep_ms=5)
    await batcher.start()
    solo = await batcher.infer(item(engine, 3.0))
    results = await asyncio.gather(batcher.infer(item(engine, 1.0)), batcher.infer(item(engine, 9.0, poison=True)),
                                   batcher.infer(item(engine, 3.0)), batcher.infer(item(engine, 2.0, rows=2)))
    await batcher.stop()
    good = [r for i, r in enumerate(results) if i != 1]
    assert all(r.result.error is None for r in good)
    assert results[0].result.outputs["y"].tolist() == [[1.0] * 4]
    assert results[2].result.outputs["y"].tolist() == solo.result.outputs["y"].tolist()
    assert results[3].result.outputs["y"].shape == (2, 4)
    assert results[1].result.error is not None and "poisoned" in results[1].result.error.message


async def test_full_queue_is_refused_with_retry_after() -> None:
    engine, batcher, _ = make_batcher(sleep_ms=50, max_batch=1, delay_ms=0, queue=2)
    await batcher.start()
    first = asyncio.create_task(batcher.infer(item(engine, 0)))
    await asyncio.sleep(0.01)           # the first request is now running, not queued
    queued = [asyncio.create_task(batcher.infer(item(engine, i))) for i in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(ResourceExhausted) as info:
        await batcher.infer(item(engine, 5))
    assert info.value.retryable
    await asyncio.gather(first, *queued)
    await batcher.stop()


async def test_cancelled_request_is_withdrawn_before_it_runs() -> None:
    engine, batcher, _ = make_batcher(sleep_ms=50, max_batch=1, delay_ms=0)
    await batcher.start()
    running = asyncio.create_task(batcher.infer(item(engine, 0)))
    await asyncio.sleep(0.01)
    waiting = asyncio.create_task(batcher.infer(item(engine, 1)))
    await asyncio.sleep(0)
    assert batcher.queue_depth == 1
    waiting.cancel()
    await asyncio.sleep(0)
    assert batcher.queue_depth == 0
    await running
    await batcher.stop()


async def test_stop_finishes_accepted_work_then_refuses_new() -> None:
    engine, batcher, metrics = make_batcher(sleep_ms=10, max_batch=2, delay_ms=50)
    await batcher.start()
    pending = [asyncio.create_task(batcher.infer(item(engine, i))) for i in range(5)]
    await asyncio.sleep(0)
    await batcher.stop()
    # stop() returned only after the engine ran every accepted row.
    rows_run = metrics.registry.get_sample_value("cmesh_model_batch_size_sum",
                                                 {"model": "s", "variant": "default"})
    assert rows_run == 5 and batcher.in_flight == 0
    results = await asyncio.gather(*pending)
    assert all(r.result.error is None for r in results)
    with pytest.raises(Draining):
        await batcher.infer(item(engine, 0))
