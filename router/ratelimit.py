"""Token buckets per tenant, with the time passed in.

A bucket holds up to ``burst`` tokens and refills at ``rate_per_s``; a request
takes one. It starts full, so a tenant's first burst is not refused. Over any
interval of t seconds a bucket grants at most ``burst + rate_per_s * t`` tokens.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

from cmesh.config import TenantConfig


class TokenBucket:
    def __init__(self, rate_per_s: float, burst: float | None = None) -> None:
        if rate_per_s <= 0:
            raise ValueError(f"rate_per_s: must be > 0, not {rate_per_s}")
        self.rate_per_s = rate_per_s
        self.burst = float(burst) if burst is not None else max(1.0, rate_per_s)
        if self.burst < 1:
            raise ValueError(f"burst: must be >= 1, not {burst}")
        self._tokens = self.burst
        self._last: float | None = None       # set by the first call: the bucket starts full then

    def tokens(self, now: float) -> float:
        self._refill(now)
        return self._tokens

    def try_take(self, now: float, n: float = 1) -> bool:
        """Take ``n`` tokens if there are that many; never takes part of them."""
        self._check(n)
        self._refill(now)
        if self._tokens + 1e-9 < n:
            return False
        self._tokens = max(0.0, self._tokens - n)
        return True

    def retry_after_ms(self, now: float, n: float = 1) -> int:
        """Milliseconds until ``n`` tokens are there (0: now)."""
        self._check(n)
        self._refill(now)
        missing = n - self._tokens
        return 0 if missing <= 1e-9 else math.ceil(missing / self.rate_per_s * 1000)

    def reconfigure(self, rate_per_s: float, burst: float | None, now: float) -> None:
        """New limits (config reload) keep the tokens earned, up to the new burst."""
        self._refill(now)
        fresh = TokenBucket(rate_per_s, burst)
        self.rate_per_s, self.burst = fresh.rate_per_s, fresh.burst
        self._tokens = min(self._tokens, self.burst)

    def _check(self, n: float) -> None:
        if n <= 0 or n > self.burst:
            # More than the burst can never be granted: a caller would wait for ever.
            raise ValueError(f"n: must be in (0, burst={self.burst:g}], not {n}")

    def _refill(self, now: float) -> None:
        if self._last is not None and now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate_per_s)
        if self._last is None or now > self._last:
            self._last = now          # a clock stepping back earns nothing


class TenantLimiter:
    """One bucket per tenant, from ``TenantConfig.rate_per_s`` and ``burst``
    (default max(1, rate)). Unknown tenants raise KeyError: authentication
    decides who is a tenant, and the caller checks before asking."""

    def __init__(self, tenants: Mapping[str, TenantConfig]) -> None:
        self._buckets = {name: TokenBucket(t.rate_per_s, t.burst) for name, t in tenants.items()}

    def __contains__(self, tenant: object) -> bool:
        return tenant in self._buckets

    def bucket(self, tenant: str) -> TokenBucket:
        try:
            return self._buckets[tenant]
        except KeyError:
            raise KeyError(f"unknown tenant {tenant!r}") from None

    def try_take(self, tenant: str, now: float, n: float = 1) -> bool:
        return self.bucket(tenant).try_take(now, n)

    def retry_after_ms(self, tenant: str, now: float, n: float = 1) -> int:
        return self.bucket(tenant).retry_after_ms(now, n)

    def reconfigure(self, tenants: Mapping[str, TenantConfig], now: float) -> None:
        """Config reload: keep buckets (and their tokens) of tenants that stay."""
        buckets = {}
        for name, t in tenants.items():
            bucket = self._buckets.get(name)
            if bucket is None:
                bucket = TokenBucket(t.rate_per_s, t.burst)
            else:
                bucket.reconfigure(t.rate_per_s, t.burst, now)
            buckets[name] = bucket
        self._buckets = buckets
