"""Outlier ejection (router/outlier.py): consecutive failures, backoff, the pool cap."""
import pytest

from cmesh.config import OutlierConfig
from router.outlier import OutlierDetector

CFG = OutlierConfig(consecutive_failures=3, base_ejection_s=5.0, max_ejection_fraction=0.5)


def fail(det, rid, now, n=3, pool_size=4, pool="m/dedicated"):
    return [det.on_failure(rid, now, pool_size, pool=pool) for _ in range(n)]


def test_consecutive_failures_eject_for_the_base_time() -> None:
    det = OutlierDetector(CFG)
    assert fail(det, "r1", 10.0) == [False, False, True]
    assert det.is_ejected("r1", 10.0) and det.is_ejected("r1", 14.99)
    assert not det.is_ejected("r1", 15.0)
    assert not det.is_ejected("r2", 10.0)
    assert det.ejected(12.0) == {"r1"} and det.next_return(12.0) == 15.0
    assert det.ejected_until("r1") == 15.0 and det.ejected_until("r2") is None


def test_a_success_resets_the_count() -> None:
    det = OutlierDetector(CFG)
    fail(det, "r1", 0.0, n=2)
    det.on_success("r1")
    assert fail(det, "r1", 0.0, n=2) == [False, False]
    assert not det.is_ejected("r1", 0.0)


def test_failures_while_ejected_are_ignored_and_the_count_restarts_on_return() -> None:
    det = OutlierDetector(CFG)
    fail(det, "r1", 0.0)
    assert fail(det, "r1", 1.0, n=5) == [False] * 5     # in-flight calls failing late
    assert fail(det, "r1", 5.0, n=2) == [False, False]  # back: needs three again
    assert det.on_failure("r1", 5.0, 4, pool="m/dedicated")


def test_repeat_ejections_double_up_to_the_cap() -> None:
    det = OutlierDetector(CFG, max_ejection_s=30.0)
    now, durations = 0.0, []
    for _ in range(5):
        assert fail(det, "r1", now)[-1]
        until = det.ejected_until("r1")
        durations.append(until - now)
        now = until                                     # fails again the moment it returns
    assert durations == [5.0, 10.0, 20.0, 30.0, 30.0]


def test_the_multiplier_decays_after_a_quiet_spell() -> None:
    det = OutlierDetector(CFG, decay_interval_s=50.0)
    fail(det, "r1", 0.0)                                # 5 s
    fail(det, "r1", 5.0)                                # 10 s, back at 15
    fail(det, "r1", 15.0 + 50.0)                        # one decay interval quiet: 10 s again
    assert det.ejected_until("r1") == 75.0
    fail(det, "r1", 75.0 + 500.0)                       # long quiet: back to the base
    assert det.ejected_until("r1") == 580.0


def test_never_more_than_the_max_fraction_of_a_pool() -> None:
    det = OutlierDetector(CFG)                          # 0.5 of a pool of 4: at most 2
    assert fail(det, "r1", 0.0)[-1] and fail(det, "r2", 0.0)[-1]
    assert fail(det, "r3", 0.0) == [False, False, False]
    assert not det.is_ejected("r3", 0.0)
    assert det.on_failure("r3", 5.0, 4, pool="m/dedicated")   # r1, r2 are back: room now
    # other pools are counted apart
    assert fail(det, "s1", 5.0, pool_size=2, pool="m/serverless")[-1]


def test_a_pool_of_one_is_never_ejected_and_size_is_taken_at_failure_time() -> None:
    det = OutlierDetector(CFG)
    assert fail(det, "only", 0.0, n=10, pool_size=1) == [False] * 10
    assert det.on_failure("only", 0.0, 2, pool="m/dedicated")   # the pool grew to 2


def test_full_fraction_lets_the_whole_pool_go() -> None:
    det = OutlierDetector(OutlierConfig(consecutive_failures=1, max_ejection_fraction=1.0))
    assert det.on_failure("a", 0.0, 2) and det.on_failure("b", 0.0, 2)


def test_forget_drops_the_history() -> None:
    det = OutlierDetector(CFG)
    fail(det, "r1", 0.0)
    det.forget("r1")
    assert not det.is_ejected("r1", 1.0) and det.ejected(1.0) == set()
    assert det.next_return(1.0) is None
    det.forget("never-seen")


def test_validation() -> None:
    with pytest.raises(ValueError, match="max_ejection_s"):
        OutlierDetector(CFG, max_ejection_s=1.0)
    with pytest.raises(ValueError, match="decay_interval_s"):
        OutlierDetector(CFG, decay_interval_s=0)
