"""The canary policy (autoscaler/canary.py) and the latency buckets it reads
(cmesh/latency.py), on hand-made figures and a clock passed in: no I/O, no sleeps."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoscaler import canary
from autoscaler.canary import Figures
from cmesh.config import ModelConfig, RolloutConfig
from cmesh.latency import BOUNDS, N_BUCKETS, add_counts, bucket_of, percentile

ROLLOUT = RolloutConfig(canary="b", steps=[5, 25, 50, 100], interval_s=60, max_error_rate=0.05,
                        max_p95_ratio=1.5, min_requests=20)


def ok(n: int, ms: float, failed: int = 0) -> Figures:
    """n answers, ``failed`` of them failures, the rest OK at ``ms`` milliseconds."""
    counts = [0] * N_BUCKETS
    counts[bucket_of(ms / 1000)] = n - failed
    return Figures(n, failed, tuple(counts))


# -- latency buckets -------------------------------------------------------------------

def test_bounds_are_log_spaced_from_a_quarter_millisecond_past_two_minutes() -> None:
    assert BOUNDS[0] == 0.00025 and BOUNDS[-2] < 120 <= BOUNDS[-1] and N_BUCKETS == len(BOUNDS) + 1
    assert all(1.19 < b / a < 1.21 for a, b in zip(BOUNDS, BOUNDS[1:]))
    assert bucket_of(0.0) == 0 and bucket_of(-1.0) == 0 and bucket_of(1e9) == N_BUCKETS - 1
    for i in (0, 10, len(BOUNDS) - 1):
        assert bucket_of(BOUNDS[i]) == i and bucket_of(BOUNDS[i] * 1.0001) == i + 1   # upper bounds inclusive


def test_percentile_interpolates_inside_the_bucket() -> None:
    assert percentile([], 0.95) is None and percentile([0] * N_BUCKETS, 0.5) is None
    one = [0] * 10
    one[4] = 100                                    # everything in (BOUNDS[3], BOUNDS[4]]
    assert percentile(one, 0.5) == pytest.approx(BOUNDS[3] + 0.5 * (BOUNDS[4] - BOUNDS[3]))
    assert percentile(one, 0.0) == pytest.approx(BOUNDS[3]) and percentile(one, 1.0) == pytest.approx(BOUNDS[4])
    two = [0, 10, 10]
    assert percentile(two, 0.5) == pytest.approx(BOUNDS[1])
    assert percentile(two, 0.75) == pytest.approx(BOUNDS[1] + 0.5 * (BOUNDS[2] - BOUNDS[1]))
    assert percentile([10], 0.5) == pytest.approx(BOUNDS[0] / 2)              # bucket 0 starts at 0
    overflow = [0] * N_BUCKETS
    overflow[-1] = 5
    assert percentile(overflow, 0.95) == BOUNDS[-1]                           # no upper bound to reach
    assert percentile([0] * (N_BUCKETS + 5) + [3], 0.5) == BOUNDS[-1]         # past the end: overflow
    with pytest.raises(ValueError, match="q: must be in"):
        percentile(one, 95)


def test_add_counts_pads_short_and_folds_long_histograms() -> None:
    assert add_counts((), ()) == ()
    assert add_counts([1, 2], [1]) == (2, 2) and add_counts([], [0, 0, 3]) == (0, 0, 3)
    long = [1] * (N_BUCKETS + 3)
    folded = add_counts(long, [])
    assert len(folded) == N_BUCKETS and folded[-1] == 4 and sum(folded) == N_BUCKETS + 3
    both = add_counts(long, [2] * N_BUCKETS)
    assert len(both) == N_BUCKETS and both[0] == 3 and both[-1] == 6


def test_figures_rates_p95_and_sums() -> None:
    assert Figures().error_rate == 0.0 and Figures().p95_ms is None
    f = ok(40, 10, failed=10)
    assert f.error_rate == 0.25 and 8 < f.p95_ms <= 12          # within the 10 ms bucket
    total = f + ok(10, 10) + Figures()
    assert (total.answered, total.failed, sum(total.counts)) == (50, 10, 40)
    assert Figures.of(3, 1, [0, 2] + [0] * (N_BUCKETS + 1) + [1]).counts[-1] == 1
    assert Figures() + Figures() == Figures()


# -- the policy ------------------------------------------------------------------------

def test_a_good_canary_moves_through_every_step_and_is_promoted() -> None:
    state = canary.start(ROLLOUT, "fp", now=0.0)
    assert (state.step, state.state, state.moved) == (0, "progressing", True)
    now = 0.0
    for step in range(3):
        state = canary.observe(state, ok(30, 12), ok(300, 12))
        held = canary.advance(ROLLOUT, state, now + 30)            # half the interval: stay
        assert (held.step, held.state, held.moved) == (step, "progressing", False)
        assert held.canary.answered == 30                          # the step's figures are kept
        now += 60
        state = canary.advance(ROLLOUT, held, now)
        assert state.moved and state.step == step + 1
        assert f"step {step} ({ROLLOUT.steps[step]:g} %) held 60 s: error 0.00 vs 0.00, p95" in state.reason
    assert state.state == "promoted" and state.step == 3 and "at 100 %: promoted" in state.reason
    after = canary.advance(ROLLOUT, canary.observe(state, ok(50, 99, failed=50), Figures()), now + 600)
    assert after.state == "promoted" and not after.moved and after.canary.answered == 0   # settled
    assert canary.weights(ROLLOUT, after, {"a": 1, "b": 1}) == {"a": 0.0, "b": 100.0}


def test_a_step_starts_with_fresh_figures_at_its_own_time() -> None:
    state = canary.advance(ROLLOUT, canary.observe(canary.start(ROLLOUT, "fp", 0.0), ok(30, 12), ok(300, 12)), 61.0)
    assert (state.step, state.step_started_at, state.canary, state.baseline) == (1, 61.0, Figures(), Figures())
    assert "on to step 1 (25 %)" in state.reason
    assert not canary.advance(ROLLOUT, state, 100.0).moved                     # 39 s into the new step


def test_passing_a_last_step_below_100_promotes_there() -> None:
    rollout = RolloutConfig(canary="b", steps=[10, 50], interval_s=10, min_requests=5)
    state = canary.start(rollout, "fp", 0.0)
    for t in (10.0, 20.0):
        state = canary.advance(rollout, canary.observe(state, ok(10, 5), ok(10, 5)), t)
    assert (state.state, state.step, state.moved) == ("promoted", 1, True)
    assert "the last step passed" in state.reason
    assert canary.weights(rollout, state, {"a": 1, "b": 0}) == {"a": 50.0, "b": 50.0}
    assert canary.start(RolloutConfig(canary="b", steps=[100]), "fp", 0.0).state == "promoted"


def test_an_erroring_canary_is_rolled_back_on_the_first_tick_with_enough_answers() -> None:
    state = canary.start(ROLLOUT, "fp", 0.0)
    state = canary.observe(state, ok(19, 10, failed=19), ok(200, 10))
    assert canary.advance(ROLLOUT, state, 5.0).state == "progressing"       # 19 < min_requests: not judged yet
    state = canary.observe(state, ok(21, 10, failed=0), ok(100, 10, failed=1))
    back = canary.advance(ROLLOUT, state, 6.0)                              # long before interval_s
    assert (back.state, back.moved, back.step) == ("rolled_back", True, 0)
    assert back.reason == "canary error rate 0.47 > baseline 0.00 + 0.05 over 40 answers"
    assert not canary.advance(ROLLOUT, back, 7.0).moved                     # reported once
    assert canary.observe(back, ok(100, 1), ok(100, 1)) is back             # no more figures
    assert canary.weights(ROLLOUT, back, {"a": 3, "b": 1, "c": 1}) == {"a": 75.0, "b": 0.0, "c": 25.0}


def test_errors_within_the_allowance_over_the_baseline_pass() -> None:
    state = canary.observe(canary.start(ROLLOUT, "fp", 0.0), ok(100, 10, failed=8), ok(100, 10, failed=4))
    assert canary.advance(ROLLOUT, state, 60.0).step == 1                   # 0.08 <= 0.04 + 0.05


def test_a_slow_canary_is_rolled_back_once_the_baseline_has_enough_answers_too() -> None:
    state = canary.observe(canary.start(ROLLOUT, "fp", 0.0), ok(30, 50), ok(10, 10))
    waiting = canary.advance(ROLLOUT, state, 1.0)
    assert waiting.state == "progressing"                                   # 10 baseline answers: no P95 verdict
    slow = canary.advance(ROLLOUT, canary.observe(waiting, Figures(), ok(10, 10)), 2.0)
    assert slow.state == "rolled_back" and slow.reason.startswith("canary p95 ")
    assert "> 1.5 x baseline" in slow.reason and "over 30 and 20 answers" in slow.reason
    near = canary.observe(canary.start(ROLLOUT, "fp", 0.0), ok(30, 12), ok(30, 10))
    assert canary.advance(ROLLOUT, near, 60.0).step == 1                    # 1.2x is within 1.5x
    failing_fast = canary.observe(canary.start(ROLLOUT, "fp", 0.0), Figures(30, 0), ok(30, 10))
    assert canary.advance(ROLLOUT, failing_fast, 1.0).state == "progressing"   # no OK latencies: no P95


def test_too_few_canary_answers_wait_past_the_interval() -> None:
    state = canary.observe(canary.start(ROLLOUT, "fp", 0.0), ok(5, 10), ok(500, 10))
    waiting = canary.advance(ROLLOUT, state, 90.0)
    assert (waiting.step, waiting.state, waiting.moved) == (0, "progressing", False)
    assert "waits for 20 canary answers, has 5" in waiting.reason
    moved = canary.advance(ROLLOUT, canary.observe(waiting, ok(15, 10), Figures()), 95.0)
    assert moved.step == 1 and moved.moved and "held 95 s" in moved.reason


def model(**changes) -> ModelConfig:
    spec = {"variants": {"a": {"source": "store://m/1", "weight": 9},
                         "b": {"source": "store://m/2", "weight": 1, "options": {"t": 0.7, "k": [1, 2]}}},
            "rollout": {"canary": "b", "steps": [10, 100]}}
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = spec
        for p in parents:
            node = node[p]
        node[leaf] = value
    return ModelConfig.model_validate(spec)


def test_fingerprint_is_stable_and_follows_the_rollout_and_the_canary() -> None:
    fp = canary.fingerprint(model())
    assert fp == canary.fingerprint(model()) and len(fp) == 32
    assert canary.fingerprint(model(variants__b__options={"k": [1, 2], "t": 0.7})) == fp   # key order
    assert canary.fingerprint(model(variants__a__weight=1)) == fp               # baseline weights
    assert canary.fingerprint(model(variants__b__weight=5)) == fp               # the rollout sets b's share
    changed = [model(rollout__steps=[10, 50, 100]), model(rollout__interval_s=30),
               model(variants__b__source="store://m/3"), model(variants__b__options={"t": 0.8, "k": [1, 2]}),
               model(variants__a__source="store://m/9", rollout__canary="a")]
    assert len({fp, *(canary.fingerprint(m) for m in changed)}) == 1 + len(changed)
    with pytest.raises(ValueError, match="no rollout"):
        canary.fingerprint(ModelConfig.model_validate({"source": "store://m/1"}))


def test_split_takes_the_canary_against_every_other_variant() -> None:
    c, b = canary.split(ROLLOUT, {"a": ok(10, 5), "b": ok(4, 5, failed=1), "c": ok(6, 5, failed=3)})
    assert (c.answered, c.failed) == (4, 1) and (b.answered, b.failed) == (16, 3)
    assert canary.split(ROLLOUT, {"a": ok(1, 1)})[0] == Figures()


def test_weights_give_the_canary_its_step_and_share_the_rest_as_declared() -> None:
    state = replace(canary.start(ROLLOUT, "fp", 0.0), step=1)
    w = canary.weights(ROLLOUT, state, {"a": 3, "b": 1, "c": 1})
    assert list(w) == ["a", "b", "c"] and w == pytest.approx({"a": 56.25, "b": 25.0, "c": 18.75})
    assert canary.weights(ROLLOUT, state, {"a": 0, "b": 1, "c": 0}) == {"a": 37.5, "b": 25.0, "c": 37.5}
    back = replace(state, state="rolled_back")
    assert canary.weights(ROLLOUT, back, {"a": 0, "b": 7, "c": 0}) == {"a": 50.0, "b": 0.0, "c": 50.0}
    assert canary.weights(ROLLOUT, state, {"b": 1}) == {"b": 100.0}
    with pytest.raises(ValueError, match="state: must be one of"):
        canary.weights(ROLLOUT, replace(state, state="paused"), {"a": 1, "b": 1})


@settings(max_examples=200, deadline=None)
@given(declared=st.dictionaries(st.sampled_from("acdefg"), st.floats(0, 1e6), min_size=1, max_size=5),
       canary_weight=st.floats(0, 1e6), step=st.integers(0, 3),
       state=st.sampled_from(["progressing", "promoted", "rolled_back"]))
def test_weights_always_sum_to_100_and_are_never_all_zero(declared, canary_weight, step, state) -> None:
    s = canary.CanaryState("fp", step, state, 0.0, Figures(), Figures())
    w = canary.weights(ROLLOUT, s, {**declared, "b": canary_weight})
    assert set(w) == set(declared) | {"b"}
    assert math.isclose(sum(w.values()), 100.0, rel_tol=1e-9) and all(v >= 0 for v in w.values())
    assert w["b"] == (0.0 if state == "rolled_back" else ROLLOUT.steps[step])
