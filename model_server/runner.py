"""What the data plane needs from a model's scheduler, batched or generative.

``DynamicBatcher`` (model_server/batching) and ``GenerationRunner``
(model_server/generation) both implement ``Runner``; the data plane does not
care which one a model has.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from model_server.engines.base import InferItem, ItemResult


@dataclass
class Completion:
    """A finished request with the time attributed to it."""

    result: ItemResult
    queue_s: float = 0.0          # waiting before its first batch
    compute_s: float = 0.0        # its share of every batch it was part of
    batch_sizes: list[int] = field(default_factory=list)  # rows of each batch it joined


@dataclass
class StreamChunk:
    """One streamed piece of a response; the last one has ``final`` and ``completion``."""

    outputs: dict[str, np.ndarray]
    final: bool = False
    completion: Completion | None = None


class Runner(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None:
        """Finish everything already accepted, then stop. New submissions fail."""

    async def infer(self, item: InferItem) -> Completion:
        """Queue one request and wait for its whole answer. Raises ResourceExhausted
        when the queue is full; cancelling the awaiting task withdraws the request."""

    def stream(self, item: InferItem) -> AsyncIterator[StreamChunk]:
        """Queue one request and yield its answer in pieces (one piece for
        non-generative models). Closing the iterator withdraws the request."""

    @property
    def queue_depth(self) -> int: ...

    @property
    def in_flight(self) -> int: ...
