"""Envoy-style outlier ejection: take one misbehaving replica out of rotation.

The breaker (router/breaker.py) protects callers from a failing *component*;
this protects a healthy component from one bad *replica* (a wedged GPU, a
half-dead process): ``consecutive_failures`` failures in a row eject it for
``base_ejection_s * 2**(k-1)`` seconds, k being how many times it has been
ejected recently (capped at ``max_ejection_s``), so a replica that keeps failing
stays out longer each time. The multiplier decays by one for every
``decay_interval_s`` the replica then goes without an ejection, as Envoy's does,
so an old incident does not punish a replica for ever.

Never more than ``max_ejection_fraction`` of a pool is ejected at once: if half
the pool is failing the problem is probably not the replicas, and ejecting more
would pile all traffic onto the rest. The pool's size is the caller's (it owns
the endpoint table), given with each failure; a pool of one is never ejected.

Which failures count is the caller's call; the same classification as the
breaker fits (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, UNKNOWN), not client
errors and not RESOURCE_EXHAUSTED (a full replica is busy, not broken: the
in-flight cap and least-loaded dispatch already steer around it).

Ejection ends by itself (``is_ejected`` is a function of ``now``); the detector
never reaches out. Failures reported for an ejected replica (calls in flight
when it was ejected) are ignored, and its count starts afresh when it returns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from cmesh.config import OutlierConfig

_EPS = 1e-9


@dataclass
class _Record:
    pool: str = ""
    consecutive: int = 0
    times_ejected: int = 0         # the backoff multiplier's exponent + 1
    ejected_until: float = 0.0     # > now while ejected
    last_ejection_end: float = 0.0


class OutlierDetector:
    def __init__(self, config: OutlierConfig, max_ejection_s: float = 300.0,
                 decay_interval_s: float | None = None) -> None:
        if max_ejection_s < config.base_ejection_s:
            raise ValueError("max_ejection_s: must be >= base_ejection_s")
        self.config = config
        self.max_ejection_s = max_ejection_s
        # Default: ten base ejections of good behaviour forgive one ejection.
        self.decay_interval_s = decay_interval_s if decay_interval_s is not None else 10 * config.base_ejection_s
        if self.decay_interval_s <= 0:
            raise ValueError("decay_interval_s: must be > 0")
        # Past this many ejections the duration is at its cap; stop the exponent there.
        self._max_times = 1 + max(0, math.ceil(math.log2(max_ejection_s / config.base_ejection_s)))
        self._records: dict[str, _Record] = {}

    def is_ejected(self, replica_id: str, now: float) -> bool:
        record = self._records.get(replica_id)
        return record is not None and now < record.ejected_until

    def ejected_until(self, replica_id: str) -> float | None:
        record = self._records.get(replica_id)
        return record.ejected_until if record is not None and record.ejected_until > 0 else None

    def on_success(self, replica_id: str, now: float | None = None) -> None:
        """A call to the replica succeeded: its consecutive-failure count resets."""
        record = self._records.get(replica_id)
        if record is not None:
            record.consecutive = 0

    def on_failure(self, replica_id: str, now: float, pool_size: int, pool: str = "") -> bool:
        """Record a failure; True if this one ejected the replica.

        ``pool`` names the group the ejection cap applies to and ``pool_size`` is
        its current size. Pass a key unique to the model and pool (for example
        ``"embedder/dedicated"``): ejected replicas are counted per key, so with
        the default "" every replica shares one group and the cap is stricter."""
        record = self._records.setdefault(replica_id, _Record(pool=pool))
        record.pool = pool
        if now < record.ejected_until:
            return False                                   # already out
        if record.ejected_until and now >= record.ejected_until > record.last_ejection_end:
            record.last_ejection_end = record.ejected_until  # it came back; count afresh
            record.consecutive = 0
        record.consecutive += 1
        if record.consecutive < self.config.consecutive_failures:
            return False
        ejected_now = sum(1 for rid, r in self._records.items()
                          if r.pool == pool and rid != replica_id and now < r.ejected_until)
        if ejected_now + 1 > self.config.max_ejection_fraction * pool_size + _EPS:
            return False              # cap reached: keep counting, eject once there is room
        self._eject(record, now)
        return True

    def ejected(self, now: float) -> set[str]:
        return {rid for rid, r in self._records.items() if now < r.ejected_until}

    def next_return(self, now: float) -> float | None:
        """When the next ejected replica comes back (so a waiting scheduler can wake)."""
        ends = [r.ejected_until for r in self._records.values() if now < r.ejected_until]
        return min(ends) if ends else None

    def forget(self, replica_id: str) -> None:
        """The replica left the endpoint table."""
        self._records.pop(replica_id, None)

    def _eject(self, record: _Record, now: float) -> None:
        if record.times_ejected and record.last_ejection_end:
            quiet = max(0.0, now - record.last_ejection_end)
            record.times_ejected = max(0, record.times_ejected - int(quiet // self.decay_interval_s))
        record.times_ejected = min(self._max_times, record.times_ejected + 1)
        duration = min(self.max_ejection_s, self.config.base_ejection_s * 2 ** (record.times_ejected - 1))
        record.ejected_until = now + duration
        record.consecutive = 0
