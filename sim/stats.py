"""Latency aggregation without lists of millions: log-bucket histograms.

Buckets are 1 % wide (``ms = 1.01 ** k``), so a quantile is exact to within
1 %. ``Histogram.add`` appends to a short buffer (one list append: the hot
paths bind ``h.add`` once) and every ``FLUSH`` values, or when a count or a
quantile is asked for, the buffer is binned in one vectorised step and
dropped, so memory stays bounded by the buckets. ``IntervalP95`` keeps one
coarser histogram (5 %) per interval of virtual time for the "fraction of
intervals with P95 within 1.5x of steady" figures.
"""
from __future__ import annotations

import math

import numpy as np

FLUSH = 65536


class Histogram:
    __slots__ = ("_inv", "_base", "_counts", "_n", "_total", "_buf", "add")

    def __init__(self, ratio: float = 1.01) -> None:
        self._base = ratio
        self._inv = 1.0 / math.log(ratio)
        self._counts: dict[int, int] = {}
        self._n = 0
        self._total = 0.0
        self._buf: list[float] = []
        self.add = self._add

    def _add(self, ms: float) -> None:
        buf = self._buf
        buf.append(ms)
        if len(buf) >= FLUSH:
            self._flush()

    def _flush(self) -> None:
        buf = self._buf
        if not buf:
            return
        xs = np.asarray(buf, dtype=float)
        buf.clear()
        ks = np.where(xs > 1e-3, np.trunc(np.log(np.maximum(xs, 1e-3)) * self._inv), -700).astype(np.int64)
        keys, counts = np.unique(ks, return_counts=True)
        c = self._counts
        for k, v in zip(keys.tolist(), counts.tolist()):
            c[k] = c.get(k, 0) + v
        self._n += len(xs)
        self._total += float(xs.sum())

    @property
    def counts(self) -> dict[int, int]:
        self._flush()
        return self._counts

    @property
    def n(self) -> int:
        return self._n + len(self._buf)

    @property
    def total(self) -> float:
        self._flush()
        return self._total

    def merge(self, other: "Histogram") -> None:
        self._flush()
        for k, v in other.counts.items():
            self._counts[k] = self._counts.get(k, 0) + v
        self._n += other.n
        self._total += other.total

    def quantile(self, q: float) -> float | None:
        counts = self.counts
        if not self._n:
            return None
        rank = q * self._n
        seen = 0
        for k in sorted(counts):
            seen += counts[k]
            if seen >= rank:
                return self._base ** (k + 0.5)
        return self._base ** (max(counts) + 0.5)

    def mean(self) -> float | None:
        n = self.n
        return self.total / n if n else None

    def summary(self) -> dict:
        r = lambda v: None if v is None else round(v, 2)   # noqa: E731
        return {"n": self.n, "p50_ms": r(self.quantile(0.50)), "p95_ms": r(self.quantile(0.95)),
                "p99_ms": r(self.quantile(0.99)), "mean_ms": r(self.mean())}


class IntervalP95:
    """One histogram per ``interval_s`` of virtual time (``add(t, ms)``: the
    interval is that of ``t``, the request's start). Failed requests
    (``fail(t)``) count as answers slower than any: an interval where more than
    5 % of the requests failed has an infinite P95, never "no data"."""

    __slots__ = ("interval_s", "_bins", "_t", "_ms", "failed")

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._bins: dict[int, Histogram] = {}
        self._t: list[float] = []
        self._ms: list[float] = []
        self.failed: dict[int, int] = {}

    def fail(self, t: float) -> None:
        i = int(t // self.interval_s)
        self.failed[i] = self.failed.get(i, 0) + 1

    def add(self, t: float, ms: float) -> None:
        self._t.append(t)
        self._ms.append(ms)
        if len(self._t) >= FLUSH:
            self._flush()

    def _flush(self) -> None:
        if not self._t:
            return
        idx = np.floor_divide(np.asarray(self._t, dtype=float), self.interval_s).astype(np.int64)
        ms = self._ms
        self._t, self._ms = [], []
        for i, v in zip(idx.tolist(), ms):
            h = self._bins.get(i)
            if h is None:
                h = self._bins[i] = Histogram(1.05)
            h._buf.append(v)
        for h in self._bins.values():
            h._flush()

    @property
    def bins(self) -> dict[int, Histogram]:
        self._flush()
        return self._bins

    def merged(self, start_s: float | None = None, end_s: float | None = None) -> Histogram:
        """One histogram of the intervals that start in ``[start_s, end_s)`` (5 % buckets)."""
        out = Histogram(1.05)
        for i, h in self.bins.items():
            t = i * self.interval_s
            if (start_s is None or t >= start_s) and (end_s is None or t < end_s):
                out.merge(h)
        return out

    def p95s(self, min_n: int = 5, start_s: float | None = None,
             end_s: float | None = None) -> dict[int, float]:
        """P95 per interval with at least ``min_n`` answers, optionally only the
        intervals that start in ``[start_s, end_s)``."""
        out = {}
        bins = self.bins
        for i in sorted(set(bins) | set(self.failed)):
            t = i * self.interval_s
            h, failed = bins.get(i), self.failed.get(i, 0)
            answered = h.n if h is not None else 0
            if answered + failed < min_n or (start_s is not None and t < start_s) or (end_s is not None and t >= end_s):
                continue
            rank = 0.95 * (answered + failed)
            out[i] = math.inf if answered < rank else h.quantile(rank / answered)
        return out

    def within(self, reference_ms: float, factor: float = 1.5, min_n: int = 5,
               start_s: float | None = None, end_s: float | None = None) -> float | None:
        """Fraction of intervals (with at least ``min_n`` answers, optionally
        only those in ``[start_s, end_s)``) whose P95 is within ``factor`` x
        ``reference_ms``."""
        values = list(self.p95s(min_n, start_s, end_s).values())
        if not values or not reference_ms:
            return None
        return sum(v <= factor * reference_ms for v in values) / len(values)
