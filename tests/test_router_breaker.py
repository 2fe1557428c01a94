"""Circuit breaker (router/breaker.py): full cycle on a fake clock."""
import pytest

from cmesh.config import BreakerConfig
from router.breaker import BreakerRegistry, CircuitBreaker, State, Verdict, classify, component_key

CFG = BreakerConfig(failure_threshold=3, cool_down_s=5.0, half_open_probes=2)


def opened(now=0.0) -> CircuitBreaker:
    b = CircuitBreaker(CFG)
    for _ in range(3):
        assert b.try_acquire(now)
        b.on_failure(now)
    return b


def test_opens_after_consecutive_failures_only() -> None:
    b = CircuitBreaker(CFG)
    b.on_failure(0.0)
    b.on_failure(0.0)
    b.on_success(0.0)                          # a success breaks the run
    b.on_failure(0.0)
    b.on_failure(0.0)
    assert b.state(0.0) is State.CLOSED and b.retry_after_ms(0.0) == 0
    b.on_failure(1.0)
    assert b.state(1.0) is State.OPEN


def test_open_refuses_with_the_time_left_in_the_cool_down() -> None:
    b = opened(now=10.0)
    assert not b.try_acquire(10.0)
    assert b.retry_after_ms(10.0) == 5000
    assert b.retry_after_ms(12.5) == 2500
    assert b.retry_after_ms(14.9999) == 1
    b.on_failure(12.0)                          # a straggler does not extend the cool-down
    b.on_success(12.0)                          # nor close it
    assert b.state(14.9) is State.OPEN and b.retry_after_ms(14.0) == 1000


def test_half_open_admits_at_most_the_configured_probes() -> None:
    b = opened(now=0.0)
    assert b.state(5.0) is State.HALF_OPEN
    assert b.try_acquire(5.0) and b.try_acquire(5.0)
    assert not b.try_acquire(5.0)
    assert b.retry_after_ms(5.0) == 5000        # every probe out: wait about a cool-down
    b.release(5.1)                              # a probe whose caller left frees its slot
    assert b.try_acquire(5.2)
    assert not b.try_acquire(5.2)


def test_a_probe_success_closes() -> None:
    b = opened(now=0.0)
    assert b.try_acquire(6.0)
    b.on_success(6.5)
    assert b.state(6.5) is State.CLOSED and b.try_acquire(6.5)
    b.on_failure(7.0)
    b.on_failure(7.0)
    assert b.state(7.0) is State.CLOSED        # the count started afresh


def test_a_probe_failure_reopens_with_a_new_cool_down() -> None:
    b = opened(now=0.0)
    assert b.try_acquire(5.0)
    b.on_failure(6.0)
    assert b.state(6.0) is State.OPEN and not b.try_acquire(6.0)
    assert b.retry_after_ms(6.0) == 5000
    assert b.state(10.9) is State.OPEN
    assert b.state(11.0) is State.HALF_OPEN and b.try_acquire(11.0)
    b.on_success(11.1)
    assert b.state(11.1) is State.CLOSED


def test_half_open_outcomes_without_a_probe_are_ignored() -> None:
    b = opened(now=0.0)
    b.on_failure(5.0)                           # straggler reporting in half-open, no probe out
    assert b.state(5.0) is State.HALF_OPEN
    b.on_success(5.0)
    assert b.state(5.0) is State.HALF_OPEN
    b.release(5.0)
    assert b.try_acquire(5.0) and b.try_acquire(5.0) and not b.try_acquire(5.0)


def test_classification_counts_only_signs_of_a_sick_component() -> None:
    for code in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN", "DATA_LOSS"):
        assert classify(code) is Verdict.FAILURE
    for code in ("OK", "INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED", "UNAUTHENTICATED"):
        assert classify(code) is Verdict.SUCCESS
    for code in ("CANCELLED", "RESOURCE_EXHAUSTED", "ABORTED", "SOMETHING_NEW"):
        assert classify(code) is Verdict.NEUTRAL
    b = CircuitBreaker(CFG)
    for _ in range(10):
        b.on_outcome(0.0, "INVALID_ARGUMENT")
        b.on_outcome(0.0, "RESOURCE_EXHAUSTED")
    assert b.state(0.0) is State.CLOSED
    for _ in range(3):
        b.on_outcome(0.0, "DEADLINE_EXCEEDED")
    assert b.state(0.0) is State.OPEN
    assert b.try_acquire(5.0)
    b.on_outcome(5.0, "CANCELLED")              # neutral: the probe slot comes back
    assert b.try_acquire(5.0) and b.try_acquire(5.0)


def test_registry_keeps_one_breaker_per_component() -> None:
    reg = BreakerRegistry(CFG)
    a, b = component_key("llm", "a"), component_key("llm", "b")
    assert a == "llm:a"
    assert reg.get(a) is reg.get(a) and reg.get(a) is not reg.get(b)
    for _ in range(3):
        reg.get(a).on_failure(0.0)
    assert not reg.get(a).try_acquire(0.0) and reg.get(b).try_acquire(0.0)


@pytest.mark.parametrize("probes", [1, 3])
def test_probe_limit_follows_the_config(probes: int) -> None:
    b = CircuitBreaker(BreakerConfig(failure_threshold=1, cool_down_s=1.0, half_open_probes=probes))
    b.on_failure(0.0)
    granted = sum(b.try_acquire(1.0) for _ in range(10))
    assert granted == probes
