"""Per model:variant answers, failures and latencies since the last load report,
for the autoscaler's canary analysis (``autoscaler.canary``).

On the hot path: one dict lookup, a bisect and a few increments per call. What
counts mirrors the breaker (``router.breaker.classify``): a call is *failed* when
the component is to blame; every call but a CANCELLED one (the caller left, which
says nothing about the variant) is *answered*; only OK answers enter the latency
histogram, so fast failures cannot make a broken canary look quick.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from cmesh.latency import N_BUCKETS, bucket_of
from router.breaker import Verdict, classify

MAX_KEYS = 4096


@dataclass(slots=True)
class Window:
    """One model:variant's figures over a report period. Mutable on purpose: it is
    incremented in place on every call and handed over whole by ``take``."""

    answered: int = 0
    failed: int = 0
    counts: list[int] = field(default_factory=lambda: [0] * N_BUCKETS)


class VariantStats:
    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self.max_keys = max_keys
        self.dropped = 0                # calls not counted because the key table was full
        self._windows: dict[tuple[str, str], Window] = {}

    def observe(self, model: str, variant: str, status: str, seconds: float) -> None:
        """One finished call with its final gRPC status name and its latency."""
        if status == "CANCELLED":
            return
        key = (model, variant)
        window = self._windows.get(key)
        if window is None:
            # Names are the config's by now; the cap only bounds memory against a bug.
            if len(self._windows) >= self.max_keys:
                self.dropped += 1
                return
            window = self._windows[key] = Window()
        window.answered += 1
        if status == "OK":
            window.counts[bucket_of(seconds)] += 1
        elif classify(status) is Verdict.FAILURE:
            window.failed += 1

    def take(self) -> dict[tuple[str, str], Window]:
        """Everything since the previous take, by (model, variant); starts afresh."""
        windows, self._windows = self._windows, {}
        return windows
