"""Retry policy and budget (router/retry.py), on a fake clock and seeded RNGs."""
import bisect
import random

import pytest

from cmesh.config import RetryConfig
from router.retry import RetryBudget, RetryDecision, RetryPolicy, is_retryable


class Clock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_only_replica_unavailable_or_full_is_retryable_and_never_after_a_byte() -> None:
    assert is_retryable("UNAVAILABLE")
    assert is_retryable("RESOURCE_EXHAUSTED", reason="queue_full")
    assert is_retryable("RESOURCE_EXHAUSTED")              # no detail: taken as a full queue
    assert not is_retryable("RESOURCE_EXHAUSTED", reason="rate_limited")
    assert not is_retryable("UNAVAILABLE", response_started=True)
    for code in ("DEADLINE_EXCEEDED", "INTERNAL", "INVALID_ARGUMENT", "NOT_FOUND", "CANCELLED", "OK"):
        assert not is_retryable(code)


def test_budget_floor_allows_retries_without_traffic() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_retries_per_s=0.5, clock=clock, window_s=10.0)
    assert sum(budget.try_withdraw() for _ in range(20)) == 5       # 0.5/s x 10 s
    clock.t = 9.9
    assert not budget.try_withdraw()
    clock.t = 11.0                                                  # the window moved past them
    assert budget.try_withdraw()


def test_budget_ratio_of_requests_in_the_window() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_retries_per_s=0.0, clock=clock, window_s=10.0)
    for _ in range(100):
        budget.deposit()
    assert budget.available() == 20
    assert sum(budget.try_withdraw() for _ in range(50)) == 20
    assert budget.window_counts() == (100, 20)
    clock.t = 5.0
    for _ in range(10):
        budget.deposit()
    assert sum(budget.try_withdraw() for _ in range(50)) == 2
    clock.t = 10.5                     # the window spans 10 s plus the current bucket
    assert budget.window_counts() == (110, 22)
    clock.t = 11.0                     # bucket [0, 1) left: the first 100 requests aged out
    assert budget.window_counts() == (10, 2) and not budget.try_withdraw()
    clock.t = 1000.0
    assert budget.window_counts() == (0, 0)


def test_budget_with_nothing_to_give() -> None:
    budget = RetryBudget(ratio=0.0, min_retries_per_s=0.0, clock=Clock())
    for _ in range(100):
        budget.deposit()
    assert not budget.try_withdraw()


def test_a_clock_stepping_back_does_not_reopen_the_window() -> None:
    clock = Clock(100.0)
    budget = RetryBudget(ratio=0.0, min_retries_per_s=0.1, clock=clock, window_s=10.0)
    assert budget.try_withdraw() and not budget.try_withdraw()
    clock.t = 50.0
    assert not budget.try_withdraw()


def simulate(ratio, floor, seconds, rate_of, seed, max_attempts=3, window_s=10.0):
    """Every attempt fails with UNAVAILABLE; each request retries while allowed.
    Returns (request times, retry times)."""
    rng = random.Random(seed)
    budget = RetryBudget(ratio, floor, clock=Clock(), window_s=window_s)
    policy = RetryPolicy(RetryConfig(max_attempts=max_attempts, budget_ratio=ratio,
                                     min_retries_per_s=floor, backoff_ms=0), budget)
    requests, retries = [], []
    t = 0.0
    while t < seconds:
        rate = rate_of(t)
        t += rng.expovariate(rate)
        policy.on_request(t)
        requests.append(t)
        for attempt in range(1, max_attempts + 1):
            decision = policy.decide(attempt, "UNAVAILABLE", False, remaining_s=30.0, now=t)
            if not decision.retry:
                assert decision.reason in ("budget", "max_attempts")
                break
            retries.append(t)
    return requests, retries


def bursty(t: float) -> float:
    # quiet, then a storm, then a trickle: the floor and the ratio both matter
    phase = int(t // 60) % 3
    return (0.3, 200.0, 2.0)[phase]


@pytest.mark.parametrize("ratio,floor", [(0.2, 3.0), (0.1, 0.0), (0.5, 1.0)])
def test_budget_bound_holds_over_a_long_failing_run(ratio: float, floor: float) -> None:
    window = 10.0
    requests, retries = simulate(ratio, floor, seconds=1800, rate_of=bursty, seed=11, window_s=window)
    n, r = len(requests), len(retries)
    span = retries[-1] - retries[0]
    # the whole run: ratio x requests plus the floor's rate over the run and one window
    assert r <= ratio * n + floor * (span + window) + 1e-6
    if floor == 0:
        assert r <= ratio * n
    # every trailing window that ends at a retry (checked by brute force)
    for i, t in enumerate(retries):
        in_window = i + 1 - bisect.bisect_left(retries, t - window)
        reqs = bisect.bisect_right(requests, t) - bisect.bisect_left(requests, t - window - window / 10)
        assert in_window <= max(ratio * reqs, floor * window) + 1e-6
    # and the budget did let retries through: it is a limit, not a wall
    assert r >= 0.5 * ratio * n


def test_budget_under_heavy_traffic_is_close_to_the_ratio() -> None:
    requests, retries = simulate(0.2, 3.0, seconds=300, rate_of=lambda t: 500.0, seed=3)
    assert 0.19 <= len(retries) / len(requests) <= 0.2 + 3.0 * 310 / len(requests)


def test_decide_checks_in_order_and_only_spends_budget_on_real_retries() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.0, min_retries_per_s=0.1, clock=clock, window_s=10.0)  # one retry
    policy = RetryPolicy(RetryConfig(max_attempts=3, backoff_ms=100), budget)
    assert policy.decide(1, "UNAVAILABLE", True, 5.0, 0.0) == RetryDecision(False, reason="response_started")
    assert policy.decide(1, "INVALID_ARGUMENT", False, 5.0, 0.0).reason == "not_retryable"
    assert policy.decide(1, "RESOURCE_EXHAUSTED", False, 5.0, 0.0, reason="message_too_large").reason \
        == "not_retryable"
    assert policy.decide(3, "UNAVAILABLE", False, 5.0, 0.0).reason == "max_attempts"
    assert policy.decide(1, "UNAVAILABLE", False, 0.1, 0.0).reason == "deadline"   # 0.1 s left, 0.1 s backoff
    assert budget.available(0.0) == 1                                             # nothing spent so far
    assert policy.decide(1, "UNAVAILABLE", False, 5.0, 0.0) == RetryDecision(True, 0.1, "retry")
    assert policy.decide(1, "RESOURCE_EXHAUSTED", False, 5.0, 0.0, reason="queue_full").reason == "budget"


def test_backoff_doubles_is_capped_and_jitter_stays_in_range() -> None:
    policy = RetryPolicy(RetryConfig(backoff_ms=10), RetryBudget(0.2, 1.0, Clock()), max_backoff_s=0.05)
    assert [policy.backoff_s(a) for a in (1, 2, 3, 4, 100)] == [0.01, 0.02, 0.04, 0.05, 0.05]
    jittered = RetryPolicy(RetryConfig(backoff_ms=10), RetryBudget(0.2, 1.0, Clock()), rng=random.Random(5))
    values = [jittered.backoff_s(2) for _ in range(200)]
    assert all(0.01 <= v <= 0.02 for v in values) and len(set(values)) > 100
    with pytest.raises(ValueError, match="attempt"):
        policy.decide(0, "UNAVAILABLE", False, 1.0, 0.0)


def test_budget_from_config_and_validation() -> None:
    budget = RetryBudget.from_config(RetryConfig(budget_ratio=0.3, min_retries_per_s=2), Clock())
    assert budget.ratio == 0.3 and budget.floor == 20.0
    with pytest.raises(ValueError):
        RetryBudget(-0.1, 1.0)
    with pytest.raises(ValueError):
        RetryBudget(0.1, 1.0, window_s=0)
