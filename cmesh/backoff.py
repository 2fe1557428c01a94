"""Reconnect back-off: jittered exponential with a low ceiling, and the matching
gRPC channel options.

A router that lost the autoscaler keeps serving on its last endpoint table, so
reconnecting costs nothing but a connection attempt; what matters is that the
router is back within about a second of the autoscaler being ready again. Two
back-offs decide that and both are bounded here: ours between RPC attempts
(``Backoff``) and gRPC's own between TCP connection attempts of a channel
(``RECONNECT_OPTIONS``; gRPC's default grows to 120 s, which is how a restart was
once noticed 8.6 s late).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

MAX_RECONNECT_S = 1.0

# gRPC's subchannel back-off: first retry after 100 ms, growing x1.6 (gRPC's own
# multiplier, ±20% jitter) to at most 1 s. Re-resolve a name at most once a second,
# so a restarted autoscaler on a new address (compose) is found as quickly.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", int(MAX_RECONNECT_S * 1000)),
                     ("grpc.dns_min_time_between_resolutions_ms", 1000)]


@dataclass
class Backoff:
    """Delays between attempts: ``initial_s`` x ``multiplier`` per failure, never
    more than ``max_s``, each drawn from ``[(1 - jitter) * d, d]`` so reconnecting
    routers spread out. ``reset()`` after a success. The rng is injected."""

    initial_s: float = 0.05
    max_s: float = MAX_RECONNECT_S
    multiplier: float = 2.0
    jitter: float = 0.5
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError("initial_s: must be > 0 and <= max_s")
        if self.multiplier < 1 or not 0 <= self.jitter < 1:
            raise ValueError("multiplier must be >= 1 and jitter in [0, 1)")

    def delay(self, failures: int) -> float:
        """The un-jittered delay after ``failures`` failures in a row (pure): ``initial_s``
        after the first, times ``multiplier`` per further one, at most ``max_s``."""
        exponent = min(max(failures, 1) - 1, 64)        # no float overflow on long outages
        return min(self.max_s, self.initial_s * self.multiplier ** exponent)

    def next(self) -> float:
        ceiling = self.delay(self.attempt + 1)
        if ceiling < self.max_s:
            self.attempt += 1                  # stop counting at the ceiling: no overflow
        return ceiling * (1.0 - self.jitter * self.rng.random())

    def reset(self) -> None:
        self.attempt = 0
