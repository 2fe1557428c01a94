"""Engines for tests and benchmarks where only timing or plumbing matters.

``identity`` returns its inputs as its outputs (router overhead benchmarks);
``sleep`` does the same after sleeping ``sleep_ms + per_row_ms * rows`` per batch
(latency and fan-out tests). Both honour a request parameter ``poison``: a
poisoned request makes the whole batch raise, which exercises the batcher's
isolation of bad requests from their batch neighbours. Option ``fail: true``
makes every batch fail: a bad model version, for rollout tests.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from model_server.engines.base import Engine, InferItem, ItemResult, register


@register
class IdentityEngine(Engine):
    kind = "identity"

    def load(self) -> None:
        if len(self.inputs) != len(self.outputs):
            raise ValueError("identity engine needs as many outputs as inputs")

    def prepare(self, inputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> InferItem:
        rows = self.check_inputs(inputs)
        return InferItem(inputs=inputs, parameters=parameters, rows=rows)

    def _compute(self, items: list[InferItem]) -> None:
        if any(item.parameters.get("poison") for item in items):
            raise RuntimeError("poisoned request in batch")
        if self.ctx.option("fail", False):
            raise RuntimeError("this version is configured to fail")

    def run_batch(self, items: list[InferItem]) -> list[ItemResult]:
        self._compute(items)
        return [ItemResult(outputs={out.name: item.inputs[inp.name]
                                    for inp, out in zip(self.inputs, self.outputs)})
                for item in items]


@register
class SleepEngine(IdentityEngine):
    kind = "sleep"

    def _compute(self, items: list[InferItem]) -> None:
        super()._compute(items)
        rows = sum(item.rows for item in items)
        seconds = (float(self.ctx.option("sleep_ms", 10)) + float(self.ctx.option("per_row_ms", 0)) * rows)
        time.sleep(seconds / 1000.0)
