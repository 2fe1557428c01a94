"""Per-model request queues: ordering, bounded admission with shedding, expiry.

Modelled on vLLM's ``vllm/v1/core/sched/request_queue.py``: one small interface
(``RequestQueue``) whose implementation gives the ordering key. The queue is pure data structure: no asyncio, no
clock of its own (``expire`` takes ``now``); the router's scheduler owns the
waiting futures and calls in here to decide *which* request goes next.

Ordering (``PriorityRequestQueue``, the router's default, DESIGN.md §4):
interactive before batch; earliest deadline first inside a class (no deadline
sorts last); then arrival, then ``seq``.

Removal is lazy: ``remove`` and ``expire`` only forget the entry's token, and the
heaps drop stale items when they surface (or when they grow past twice the live
size, so a queue whose callers keep giving up cannot leak).
"""
from __future__ import annotations

import heapq
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

LatencyClass = Literal["interactive", "batch"]

_CLASS_RANK = {"interactive": 0, "batch": 1}
# Heaps are compacted when they hold this many more items than live entries.
_COMPACT_SLACK = 64


@dataclass(eq=False)
class QueueEntry:
    """One waiting request. Compared by identity: the same request may be queued
    again (put back after a failed dispatch) and must stay one entry. Its fields
    are heap keys: do not change them while it is queued."""

    latency_class: LatencyClass
    deadline: float | None          # monotonic seconds; None: no deadline (sorts last)
    arrival: float                  # monotonic seconds
    seq: int = 0                    # caller's tiebreak; push order breaks remaining ties
    payload: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.latency_class not in _CLASS_RANK:
            raise ValueError(f"latency_class: must be 'interactive' or 'batch', not {self.latency_class!r}")

    @property
    def deadline_key(self) -> float:
        return math.inf if self.deadline is None else self.deadline


@dataclass(frozen=True)
class Admission:
    """What ``offer`` did: ``accepted`` says whether the new entry is queued;
    ``shed`` holds queued batch entries evicted to make room (the caller fails
    each with RESOURCE_EXHAUSTED) - at most one today, a tuple so callers loop."""

    accepted: bool
    shed: tuple[QueueEntry, ...] = ()


class RequestQueue(ABC):
    """A bounded queue of ``QueueEntry``. ``push`` ignores the bound (it puts back
    a request that already held a place); new requests come in through ``offer``."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity: must be >= 1, not {capacity}")
        self.capacity = capacity
        self._tokens: dict[QueueEntry, int] = {}   # live entries -> their current token
        self._next_token = 0
        # Every heap item ends (..., token, entry); it is live while the entry's
        # current token matches, so re-pushing a removed entry cannot revive it twice.
        self._order: list[tuple] = []              # best first
        self._batch_worst: list[tuple] = []        # batch entries, worst first
        self._by_deadline: list[tuple] = []        # entries with a deadline, earliest first
        self._batch_live = 0

    @abstractmethod
    def _order_key(self, entry: QueueEntry) -> tuple:
        """Smaller sorts first (pops first)."""

    # -- the interface -------------------------------------------------------------

    def push(self, entry: QueueEntry) -> None:
        if entry in self._tokens:
            raise ValueError("entry is already queued")
        token = self._next_token
        self._next_token += 1
        self._tokens[entry] = token
        heapq.heappush(self._order, (*self._order_key(entry), token, entry))
        if entry.latency_class == "batch":
            self._batch_live += 1
            # The worst batch entry: latest deadline, then newest. Negated for a min-heap.
            heapq.heappush(self._batch_worst,
                           (-entry.deadline_key, -entry.arrival, -entry.seq, -token, token, entry))
        if entry.deadline is not None:
            heapq.heappush(self._by_deadline, (entry.deadline, token, entry))

    def offer(self, entry: QueueEntry) -> Admission:
        """Admit a new request, shedding the worst batch entry for an interactive
        one when full. A batch request never displaces anything: under overload
        batch work is what we give up first (DESIGN.md §2: shed -> RESOURCE_EXHAUSTED)."""
        if len(self) < self.capacity:
            self.push(entry)
            return Admission(accepted=True)
        if entry.latency_class == "interactive" and self._batch_live:
            shed = self._pop_worst_batch()
            self.push(entry)
            return Admission(accepted=True, shed=(shed,))
        return Admission(accepted=False)

    def pop(self) -> QueueEntry:
        """Remove and return the best entry. IndexError when empty."""
        entry = self._peek_live()
        heapq.heappop(self._order)
        self._forget(entry)
        self._maybe_compact()
        return entry

    def peek(self) -> QueueEntry:
        """The best entry, left in place. IndexError when empty."""
        return self._peek_live()

    def remove(self, entry: QueueEntry) -> bool:
        """Take out an entry whose caller gave up; False if it was not queued."""
        if entry not in self._tokens:
            return False
        self._forget(entry)
        self._maybe_compact()
        return True

    def expire(self, now: float) -> list[QueueEntry]:
        """Remove and return, earliest first, every entry whose deadline is at or
        before ``now``: with no time left there is nothing useful to dispatch."""
        out = []
        heap = self._by_deadline
        while heap and heap[0][0] <= now:
            _, token, entry = heapq.heappop(heap)
            if self._tokens.get(entry) == token:
                self._forget(entry)
                out.append(entry)
        self._maybe_compact()
        return out

    def count(self, latency_class: LatencyClass) -> int:
        return self._batch_live if latency_class == "batch" else len(self) - self._batch_live

    def __len__(self) -> int:
        return len(self._tokens)

    def __bool__(self) -> bool:
        return bool(self._tokens)

    def __contains__(self, entry: object) -> bool:
        return entry in self._tokens

    def __iter__(self) -> Iterator[QueueEntry]:
        """Live entries in no particular order."""
        return iter(list(self._tokens))

    # -- internals -----------------------------------------------------------------

    def _peek_live(self) -> QueueEntry:
        heap = self._order
        while heap:
            *_, token, entry = heap[0]
            if self._tokens.get(entry) == token:
                return entry
            heapq.heappop(heap)
        raise IndexError("peek from an empty queue")

    def _pop_worst_batch(self) -> QueueEntry:
        heap = self._batch_worst
        while heap:
            *_, token, entry = heapq.heappop(heap)
            if self._tokens.get(entry) == token:
                self._forget(entry)
                return entry
        raise AssertionError("batch count says a batch entry is queued")  # pragma: no cover

    def _forget(self, entry: QueueEntry) -> None:
        del self._tokens[entry]
        if entry.latency_class == "batch":
            self._batch_live -= 1

    def _maybe_compact(self) -> None:
        # O(n) rebuild only once a heap holds n + 64 stale items: amortised O(1).
        limit = 2 * len(self._tokens) + _COMPACT_SLACK
        for name in ("_order", "_batch_worst", "_by_deadline"):
            heap = getattr(self, name)
            if len(heap) > limit:
                live = [item for item in heap if self._tokens.get(item[-1]) == item[-2]]
                heapq.heapify(live)
                setattr(self, name, live)


class PriorityRequestQueue(RequestQueue):
    """Interactive before batch, then earliest deadline, then arrival and seq."""

    def _order_key(self, entry: QueueEntry) -> tuple:
        return (_CLASS_RANK[entry.latency_class], entry.deadline_key, entry.arrival, entry.seq)


def make_queue(capacity: int) -> RequestQueue:
    """One model's queue; ``capacity`` is ``RouterConfig.max_queue_per_model``."""
    return PriorityRequestQueue(capacity)
