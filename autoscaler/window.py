"""Per-model load over time, as routers (and replicas) report it.

The scaling policy (``autoscaler.policy``) never sees raw reports: it sees
averages over a stable and a panic window, the age of the newest report, the
requests held for a first replica and the time of the last traffic. This module
turns a stream of reports into those numbers. It does no I/O and reads no
clock: every call takes ``now`` (the autoscaler's own monotonic time at receipt,
not the reporter's timestamp, so clock skew between machines cannot age a
report into staleness or out of the window).

Several sources. Every router reports its own share of a model's load, so the
model's load at an instant is the *sum over sources* of each source's latest
report. Time is cut into buckets of ``bucket_s``; a bucket keeps, per source,
only that source's latest gauge reading (concurrency, held) and the sum of its
arrival counts. A bucket's total is evaluated with carry-forward: each source
contributes its most recent reading at or before the bucket's end, as long as
that reading is at most ``source_ttl_s`` old. So

* two routers that report at different phases of a bucket still add up (the
  one that has not reported in *this* bucket is carried from the last one);
* a router that died stops counting ``source_ttl_s`` after its last report
  instead of freezing its last load into the averages forever.

Memory is bounded: buckets older than ``retention_s + source_ttl_s`` are
dropped (the extra ``source_ttl_s`` lets a reading just before the window be
carried into it), and each bucket holds one entry per live source.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class _Reading:
    t: float
    concurrency: float
    held: int


@dataclass
class _Bucket:
    readings: dict[str, _Reading] = field(default_factory=dict)
    arrivals: dict[str, int] = field(default_factory=dict)


@dataclass
class _Series:
    buckets: dict[int, _Bucket] = field(default_factory=dict)
    oldest_kept: int | None = None      # smallest bucket index that may still exist
    last_t: float | None = None         # newest report, any source
    last_traffic: float | None = None   # newest report showing load (never trimmed)
    first_t: float | None = None        # oldest report still kept


class MetricsWindow:
    """Load samples per model and source; averages over sliding windows.

    ``retention_s`` should be the stable window (the longest query window);
    ``source_ttl_s`` how long a source's last reading still counts when it sends
    no new one (the autoscaler's ``stale_after_s`` is the natural value);
    ``bucket_s`` the resolution (routers report about once per ``tick_s``)."""

    def __init__(self, retention_s: float, *, source_ttl_s: float = 5.0, bucket_s: float = 1.0) -> None:
        if retention_s <= 0 or source_ttl_s <= 0 or bucket_s <= 0:
            raise ValueError("retention_s, source_ttl_s and bucket_s must be > 0")
        self.retention_s = retention_s
        self.source_ttl_s = source_ttl_s
        self.bucket_s = bucket_s
        self._series: dict[str, _Series] = {}

    # ------------------------------------------------------------------ input

    def add(self, model: str, now: float, concurrency: float, arrivals: int = 0, held: int = 0,
            source: str = "") -> None:
        """One report from ``source`` about ``model`` received at ``now``.

        ``concurrency`` is a gauge (in flight + queued for the model at that
        source); ``held`` a gauge (requests held for a first replica);
        ``arrivals`` a *delta*: requests that arrived since this source's
        previous report (they are summed, not replaced)."""
        if concurrency < 0 or arrivals < 0 or held < 0:
            raise ValueError("concurrency, arrivals and held must be >= 0")
        s = self._series.get(model)
        if s is None:
            s = self._series[model] = _Series()
        idx = self._index(now)
        if s.last_t is not None and idx < self._index(s.last_t - self.retention_s - self.source_ttl_s):
            return                                    # arrived too late to matter
        bucket = s.buckets.get(idx)
        if bucket is None:
            bucket = s.buckets[idx] = _Bucket()
            if s.oldest_kept is None or idx < s.oldest_kept:
                s.oldest_kept = idx
        prev = bucket.readings.get(source)
        if prev is None or prev.t <= now:             # an out-of-order older reading loses
            bucket.readings[source] = _Reading(now, float(concurrency), int(held))
        if arrivals:
            bucket.arrivals[source] = bucket.arrivals.get(source, 0) + int(arrivals)
        if s.last_t is None or now > s.last_t:
            s.last_t = now
        if s.first_t is None or now < s.first_t:
            s.first_t = now
        if concurrency > 0 or arrivals > 0 or held > 0:
            if s.last_traffic is None or now > s.last_traffic:
                s.last_traffic = now
        self._trim(s, self._index(s.last_t))

    def forget(self, model: str) -> None:
        """Drop a model (removed from the config)."""
        self._series.pop(model, None)

    def models(self) -> list[str]:
        return list(self._series)

    # ---------------------------------------------------------------- queries

    def average_concurrency(self, model: str, now: float, window_s: float) -> float | None:
        """Time-weighted mean over ``(now - window_s, now]`` of the summed
        concurrency; None when no source reported within the window (missing
        data, which is not the same as zero load)."""
        s = self._series.get(model)
        if s is None or s.last_t is None or s.first_t is None:
            return None
        start = now - window_s
        if s.last_t <= start:
            return None                               # nothing reported inside the window
        # Averaging starts where data starts: a model first seen 3 s ago is
        # averaged over 3 s, not diluted with zeros for the rest of the window
        # (scale-from-zero must not lag).
        lower = max(start, s.first_t)
        first_idx = self._index(lower)
        last_idx = self._index(now)
        latest: dict[str, _Reading] = {}
        # Readings from before the window may carry into it (within the TTL).
        for idx in sorted(i for i in s.buckets if i < first_idx):
            self._merge(latest, s.buckets[idx])
        # A time-weighted mean of the summed load, each bucket valued at its
        # end and weighted by its overlap with the window, so partial buckets
        # at either edge count for the time they cover.
        total = weight = 0.0
        value = 0.0
        # Past the newest report plus the TTL every source has aged out: the
        # rest of the window is zero load, added in one step (the loop stays
        # bounded by the data kept, whatever ``now`` and ``window_s`` are).
        stop_idx = min(last_idx, self._index(s.last_t + self.source_ttl_s))
        for idx in range(first_idx, stop_idx + 1):
            bucket = s.buckets.get(idx)
            if bucket is not None:
                self._merge(latest, bucket)
            at = min(now, (idx + 1) * self.bucket_s)
            value = sum(r.concurrency for r in latest.values()
                        if r.t <= at and at - r.t <= self.source_ttl_s)
            w = at - max(lower, idx * self.bucket_s)
            if w > 0:
                total += value * w
                weight += w
        if stop_idx < last_idx:
            value = 0.0
            weight += max(0.0, now - max(lower, (stop_idx + 1) * self.bucket_s))
        return total / weight if weight > 0 else value

    def last_sample_age(self, model: str, now: float) -> float | None:
        """Seconds since the newest report about ``model`` from any source."""
        s = self._series.get(model)
        if s is None or s.last_t is None:
            return None
        return max(0.0, now - s.last_t)

    def span(self, model: str, now: float, window_s: float) -> float:
        """How much of ``(now - window_s, now]`` the kept data covers (averages and
        rates over a window start where the data starts); 0 when nothing is kept."""
        s = self._series.get(model)
        if s is None or s.first_t is None:
            return 0.0
        return max(0.0, now - max(now - window_s, s.first_t))

    def last_traffic(self, model: str) -> float | None:
        """When a report last showed load (concurrency, arrivals or held > 0)."""
        s = self._series.get(model)
        return None if s is None else s.last_traffic

    def held(self, model: str, now: float) -> int:
        """Requests held for a first replica now: each live source's latest count, summed."""
        return int(sum(r.held for r in self._fresh(model, now).values()))

    def concurrency(self, model: str, now: float) -> float:
        """Instantaneous load: each live source's latest concurrency, summed (for Status)."""
        return sum(r.concurrency for r in self._fresh(model, now).values())

    def latest(self, model: str) -> dict[str, float] | None:
        """The newest state as of the newest report: time, summed concurrency and
        held over the sources still live then (for Status; no ``now`` needed)."""
        s = self._series.get(model)
        if s is None or s.last_t is None:
            return None
        fresh = self._fresh(model, s.last_t)
        return {"t": s.last_t, "concurrency": sum(r.concurrency for r in fresh.values()),
                "held": float(sum(r.held for r in fresh.values()))}

    def arrivals(self, model: str, now: float, window_s: float) -> int:
        """Requests that arrived within the window, all sources."""
        s = self._series.get(model)
        if s is None:
            return 0
        lo = now - window_s
        return sum(n for idx, b in s.buckets.items() if (idx + 1) * self.bucket_s > lo
                   for n in b.arrivals.values())

    def arrival_counts(self, model: str, now: float, window_s: float) -> list[int]:
        """Arrivals per whole bucket in the covered part of ``(now - window_s, now]``,
        all sources, oldest first (for a trend, ``autoscaler.trend``). The bucket
        ``now`` falls in is still filling and a first bucket that starts before
        the data does holds a partial count: both are left out; a bucket without
        reports counts 0 (nothing was reported arriving then)."""
        s = self._series.get(model)
        if s is None or s.first_t is None:
            return []
        lower = max(now - window_s, s.first_t)
        first = math.ceil(lower / self.bucket_s - 1e-9)
        return [sum(s.buckets[i].arrivals.values()) if i in s.buckets else 0
                for i in range(first, self._index(now))]

    # ---------------------------------------------------------------- helpers

    def _index(self, t: float) -> int:
        return math.floor(t / self.bucket_s)

    @staticmethod
    def _merge(latest: dict[str, _Reading], bucket: _Bucket) -> None:
        for src, r in bucket.readings.items():
            cur = latest.get(src)
            if cur is None or r.t >= cur.t:
                latest[src] = r

    def _fresh(self, model: str, now: float) -> dict[str, _Reading]:
        s = self._series.get(model)
        latest: dict[str, _Reading] = {}
        if s is None:
            return latest
        for idx in sorted(s.buckets):
            self._merge(latest, s.buckets[idx])
        return {src: r for src, r in latest.items() if r.t <= now and now - r.t <= self.source_ttl_s}

    def _trim(self, s: _Series, newest_idx: int) -> None:
        horizon = self._index(newest_idx * self.bucket_s - self.retention_s - self.source_ttl_s)
        if s.oldest_kept is None or s.oldest_kept >= horizon:
            return                                    # trimming runs once per new bucket, not per report
        for idx in [i for i in s.buckets if i < horizon]:
            del s.buckets[idx]
        s.oldest_kept = min(s.buckets) if s.buckets else None
        kept = [r.t for b in s.buckets.values() for r in b.readings.values()]
        s.first_t = min(kept) if kept else None
