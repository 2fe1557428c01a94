"""Latency histograms in fixed, log-spaced buckets, shared by routers (which count)
and the autoscaler (which compares canary and baseline).

The bounds are part of the wire contract (``ModelLoad.latency_counts[i]`` counts
answers in bucket ``i``), so they are a constant, not a setting: every router and
autoscaler must agree on them. Bucket ``i`` holds latencies in
``(BOUNDS[i-1], BOUNDS[i]]``; the last bucket, past ``BOUNDS[-1]``, is the overflow.
Growing by 1.2x, an estimate inside a bucket is off by at most ~20 %, the same at
1 ms and at 10 s.
"""
from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

FIRST_S = 0.00025
GROWTH = 1.2
LAST_S = 120.0


def _bounds() -> tuple[float, ...]:
    # Repeated multiplication (exact IEEE steps, unlike pow) and 4 significant digits:
    # the same constants on every platform and Python, so histograms add up across machines.
    bounds, x = [], FIRST_S
    while True:
        bounds.append(float(f"{x:.4g}"))
        if x >= LAST_S:
            return tuple(bounds)
        x *= GROWTH


BOUNDS: tuple[float, ...] = _bounds()      # upper bounds in seconds, 0.25 ms .. ~125 s
N_BUCKETS = len(BOUNDS) + 1                # plus the overflow bucket


def bucket_of(seconds: float) -> int:
    """The bucket counting a latency of ``seconds`` (negatives and NaN: bucket 0)."""
    return bisect_left(BOUNDS, seconds)


def add_counts(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    """Bucket-wise sum of two histograms as they come off the wire: a shorter one is
    zero-padded, anything past ``N_BUCKETS`` is folded into the overflow bucket. The
    result is as long as the longer input, at most ``N_BUCKETS`` (empty + empty: empty)."""
    size = min(max(len(a), len(b)), N_BUCKETS)
    out = [0] * size
    for counts in (a, b):
        for i, c in enumerate(counts):
            out[min(i, N_BUCKETS - 1)] += c
    return tuple(out)


def percentile(counts: Sequence[int], q: float) -> float | None:
    """The ``q``-quantile (0 <= q <= 1) in seconds, interpolated linearly inside its
    bucket (as Prometheus' ``histogram_quantile``); None for an empty histogram. A
    quantile in the overflow bucket is reported as ``BOUNDS[-1]``: there is no upper
    bound to interpolate to. Negative counts (never sent by a router) count as 0."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q: must be in [0, 1], got {q}")
    total = sum(c for c in counts if c > 0)
    if total == 0:
        return None
    rank = q * total
    below = 0
    for i, c in enumerate(counts):
        if c <= 0:
            continue
        if below + c >= rank:
            if i >= len(BOUNDS):
                return BOUNDS[-1]
            lower = BOUNDS[i - 1] if i > 0 else 0.0
            return lower + (BOUNDS[i] - lower) * (rank - below) / c
        below += c
    return BOUNDS[-1]      # unreachable: the last non-empty bucket reaches total
