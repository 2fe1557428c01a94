"""Batch forming as a pure function of the waiting requests and ``now``.

Rules, in order:
1. The oldest request's batch runs once it has waited ``max_queue_delay`` (or at
   once when flushing on shutdown) - so no request waits longer than the delay
   for batch-mates, and the oldest is never starved by fuller buckets.
2. Otherwise any bucket that can fill a whole batch runs at once.
3. Otherwise wait until the oldest request's delay is up.
A batch takes requests of one sequence-length bucket in arrival order, skipping
any that would overflow ``max_batch_size`` rows (they lead the next batch).
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int
    max_queue_delay_s: float
    buckets: tuple[int, ...] = ()     # ascending length bounds; () = one bucket

    def bucket_of(self, length: int) -> int:
        if not self.buckets or length <= 0:
            return 0
        return bisect.bisect_left(self.buckets, length)


@dataclass(frozen=True)
class Pending:
    """What the policy sees of one waiting request."""

    arrived: float
    rows: int
    bucket: int = 0


@dataclass(frozen=True)
class Decision:
    take: tuple[int, ...] = ()        # indices into the pending sequence, to run now
    wake_at: float | None = None      # when to decide again if nothing new arrives


def _fill(policy: BatchPolicy, pending: Sequence[Pending], bucket: int) -> tuple[tuple[int, ...], int]:
    take, rows = [], 0
    for i, p in enumerate(pending):
        if p.bucket != bucket:
            continue
        if rows + p.rows > policy.max_batch_size:
            if rows == 0:             # a single request bigger than a batch runs alone
                return (i,), p.rows
            continue
        take.append(i)
        rows += p.rows
        if rows == policy.max_batch_size:
            break
    return tuple(take), rows


def decide(policy: BatchPolicy, pending: Sequence[Pending], now: float, *,
           flush: bool = False) -> Decision:
    if not pending:
        return Decision()
    head = pending[0]
    due_at = head.arrived + policy.max_queue_delay_s
    if flush or now >= due_at:
        return Decision(take=_fill(policy, pending, head.bucket)[0])
    for bucket in dict.fromkeys(p.bucket for p in pending):
        take, rows = _fill(policy, pending, bucket)
        if rows >= policy.max_batch_size:
            return Decision(take=take)
    return Decision(wake_at=due_at)
