"""Engines that declare ``concurrent_batches`` get batches run side by side: a slow
batch holds one slot, and the batches formed behind it still run and answer."""
import asyncio
import threading

import numpy as np

from model_server.batching import BatchPolicy, DynamicBatcher
from model_server.engines.base import EngineContext
from model_server.engines.testing import IdentityEngine
from model_server.metrics import ServerMetrics
from test_batcher import MANIFEST


class GatedEngine(IdentityEngine):
    """A batch holding a 'slow' row blocks until released: what one slow SQL query does."""

    def __init__(self, ctx, concurrent: int) -> None:
        super().__init__(ctx)
        self.concurrent_batches = concurrent
        self.release = threading.Event()
        self.at_most = 0
        self._running = 0
        self._lock = threading.Lock()

    def run_batch(self, items):
        with self._lock:
            self._running += 1
            self.at_most = max(self.at_most, self._running)
        try:
            if any(it.parameters.get("slow") for it in items):
                assert self.release.wait(10)
            return super().run_batch(items)
        finally:
            with self._lock:
                self._running -= 1


def make(concurrent: int):
    engine = GatedEngine(EngineContext(model="s", variant="default", model_dir=None, manifest=MANIFEST,
                                       max_batch_size=1), concurrent)
    engine.load()
    batcher = DynamicBatcher(engine, BatchPolicy(1, 0.0), max_queue_size=64,
                             metrics=ServerMetrics().model("s", "default"))
    return engine, batcher


def item(engine, value: float, **params):
    return engine.prepare({"x": np.full((1, 4), value, dtype=np.float32)}, params)


async def test_batches_behind_a_slow_one_are_answered_first() -> None:
    engine, batcher = make(concurrent=3)
    await batcher.start()
    slow = asyncio.create_task(batcher.infer(item(engine, 0.0, slow=True)))
    cheap = await asyncio.gather(*(batcher.infer(item(engine, float(i))) for i in range(1, 6)))
    assert not slow.done()                    # still held, yet the others got through
    assert [c.result.outputs["y"][0, 0] for c in cheap] == [1.0, 2.0, 3.0, 4.0, 5.0]
    engine.release.set()
    assert (await slow).result.outputs["y"][0, 0] == 0.0
    await batcher.stop()
    assert 2 <= engine.at_most <= 3           # side by side, and never more than declared


async def test_one_slot_keeps_the_old_order() -> None:
    engine, batcher = make(concurrent=1)
    await batcher.start()
    slow = asyncio.create_task(batcher.infer(item(engine, 0.0, slow=True)))
    await asyncio.sleep(0.05)
    cheap = asyncio.create_task(batcher.infer(item(engine, 1.0)))
    await asyncio.sleep(0.05)
    assert not cheap.done()                   # waits behind the slow batch, as engines expect
    engine.release.set()
    await asyncio.gather(slow, cheap)
    await batcher.stop()
    assert engine.at_most == 1
