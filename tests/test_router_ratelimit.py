"""Token buckets (router/ratelimit.py) on plain-float clocks."""
import random

import pytest

from cmesh.config import TenantConfig
from router.ratelimit import TenantLimiter, TokenBucket


def test_starts_full_then_refuses_then_refills() -> None:
    bucket = TokenBucket(rate_per_s=10, burst=5)
    assert all(bucket.try_take(0.0) for _ in range(5))
    assert not bucket.try_take(0.0)
    assert bucket.retry_after_ms(0.0) == 100
    assert not bucket.try_take(0.05)
    assert bucket.retry_after_ms(0.05) == 50
    assert bucket.try_take(0.1)
    assert bucket.tokens(10.0) == 5                    # refill stops at the burst


def test_take_many_is_all_or_nothing() -> None:
    bucket = TokenBucket(rate_per_s=2, burst=4)
    assert bucket.try_take(0.0, n=3)
    assert not bucket.try_take(0.0, n=2)
    assert bucket.tokens(0.0) == 1
    assert bucket.retry_after_ms(0.0, n=2) == 500
    with pytest.raises(ValueError, match="burst"):
        bucket.try_take(0.0, n=5)                      # could never succeed
    with pytest.raises(ValueError):
        bucket.retry_after_ms(0.0, n=0)


def test_default_burst_is_max_of_one_and_the_rate() -> None:
    assert TokenBucket(200).burst == 200
    slow = TokenBucket(0.5)
    assert slow.burst == 1
    assert slow.try_take(0.0) and not slow.try_take(1.0)
    assert slow.retry_after_ms(1.0) == 1000 and slow.try_take(2.0)


def test_a_clock_stepping_back_earns_nothing() -> None:
    bucket = TokenBucket(rate_per_s=1, burst=1)
    assert bucket.try_take(100.0)
    assert not bucket.try_take(50.0)
    assert not bucket.try_take(100.5)
    assert bucket.try_take(101.0)


def test_grants_never_exceed_burst_plus_rate_times_time() -> None:
    rng = random.Random(2)
    bucket = TokenBucket(rate_per_s=20, burst=30)
    now, granted = 0.0, 0
    for _ in range(20_000):
        now += rng.expovariate(100)                    # asks 5x faster than allowed
        granted += bucket.try_take(now)
    assert granted <= 30 + 20 * now + 1e-6
    assert granted >= 0.95 * 20 * now


def test_tenant_limiter_uses_each_tenants_config() -> None:
    tenants = {"acme": TenantConfig(api_keys_env="K1", rate_per_s=2),
               "globex": TenantConfig(api_keys_env="K2", rate_per_s=1, burst=3)}
    limiter = TenantLimiter(tenants)
    assert "acme" in limiter and "nobody" not in limiter
    assert [limiter.try_take("acme", 0.0) for _ in range(3)] == [True, True, False]
    assert [limiter.try_take("globex", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.retry_after_ms("acme", 0.0) == 500
    with pytest.raises(KeyError, match="nobody"):
        limiter.try_take("nobody", 0.0)


def test_reconfigure_keeps_earned_tokens_up_to_the_new_burst() -> None:
    limiter = TenantLimiter({"acme": TenantConfig(api_keys_env="K", rate_per_s=10)})
    for _ in range(4):
        limiter.try_take("acme", 0.0)                  # 6 of 10 left
    limiter.reconfigure({"acme": TenantConfig(api_keys_env="K", rate_per_s=1, burst=2),
                         "new": TenantConfig(api_keys_env="N", rate_per_s=1)}, now=0.0)
    assert limiter.bucket("acme").tokens(0.0) == 2
    assert limiter.try_take("new", 0.0)


def test_validation() -> None:
    with pytest.raises(ValueError, match="rate_per_s"):
        TokenBucket(0)
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(1, burst=0.5)
