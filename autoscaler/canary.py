"""The canary policy: pure functions of a rollout's state, its figures and ``now``.

A rollout (``cmesh.config.RolloutConfig``) moves one variant, the canary, through
traffic steps. Over each step the driver adds up what the routers report per
model:variant (``observe``): the canary's figures, and the baseline's (every other
variant together). Every control tick ``advance`` decides:

* a breach, judged as soon as the canary has ``min_requests`` answers in the step
  (so a bad canary goes well within one interval) -> ``rolled_back``: its error
  rate above the baseline's (0 while the baseline has no answers) by more than
  ``max_error_rate``, or its P95 more than ``max_p95_ratio`` times the baseline's
  (when the baseline has ``min_requests`` answers too);
* the step's interval over with enough canary answers and no breach -> the next
  step, with fresh figures; a step of 100 % leaves no baseline to compare with, so
  reaching it (or passing the last step) is ``promoted``;
* otherwise the state stays, saying what it waits for.

``weights`` turns a state into the A/B weights the routers draw by. The driver
(``autoscaler.controller``) does the I/O: it feeds reports, ticks and publishes the
weights when ``moved`` says a step or the state changed.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from cmesh.config import ModelConfig, RolloutConfig
from cmesh.latency import add_counts, percentile

PROGRESSING = "progressing"
PROMOTED = "promoted"
ROLLED_BACK = "rolled_back"
STATES = (PROGRESSING, PROMOTED, ROLLED_BACK)


@dataclass(frozen=True)
class Figures:
    """Answers, failures (the component to blame, ``router.breaker.classify``) and
    the OK answers' latency histogram (``cmesh.latency`` buckets)."""

    answered: int = 0
    failed: int = 0
    counts: tuple[int, ...] = ()

    @classmethod
    def of(cls, answered: int, failed: int, counts: Sequence[int] = ()) -> "Figures":
        """From wire values: the histogram normalised to at most N_BUCKETS."""
        return cls(int(answered), int(failed), add_counts((), counts))

    @property
    def error_rate(self) -> float:
        return self.failed / self.answered if self.answered else 0.0

    @property
    def p95_ms(self) -> float | None:
        p95 = percentile(self.counts, 0.95)
        return None if p95 is None else p95 * 1000.0

    def __add__(self, other: "Figures") -> "Figures":
        return Figures(self.answered + other.answered, self.failed + other.failed,
                       add_counts(self.counts, other.counts))


@dataclass(frozen=True)
class CanaryState:
    fingerprint: str            # the rollout it belongs to (``fingerprint``)
    step: int                   # index into rollout.steps
    state: str                  # one of STATES
    step_started_at: float      # monotonic seconds
    canary: Figures             # over the current step so far
    baseline: Figures
    reason: str = ""            # why it last moved, rolled back, or what it waits for
    moved: bool = False         # the last start/advance changed the step or state: publish weights


def fingerprint(model: ModelConfig) -> str:
    """A rollout's identity: its spec and the canary's source and options. A new
    apply with the same ones keeps the rollout's state; any change restarts it."""
    rollout = model.rollout
    if rollout is None or model.variants is None:
        raise ValueError("fingerprint: the model has no rollout")
    canary = model.variants[rollout.canary]
    spec = {"rollout": rollout.model_dump(mode="json"), "source": canary.source, "options": canary.options}
    # Sorted keys and fixed separators: the same text, so the same hash, in every process.
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def split(rollout: RolloutConfig, by_variant: Mapping[str, Figures]) -> tuple[Figures, Figures]:
    """(canary, baseline) from one report's figures per variant: the baseline is
    every other variant together."""
    baseline = Figures()
    for variant, figures in by_variant.items():
        if variant != rollout.canary:
            baseline = baseline + figures
    return by_variant.get(rollout.canary, Figures()), baseline


def start(rollout: RolloutConfig, fp: str, now: float) -> CanaryState:
    """A new rollout at its first step (promoted at once when that step is 100 %)."""
    state = CanaryState(fp, 0, PROGRESSING, now, Figures(), Figures(),
                        reason=f"started at step 0 ({rollout.steps[0]:g} %)", moved=True)
    if rollout.steps[0] >= 100:
        return replace(state, state=PROMOTED, reason="the first step is 100 %: promoted without analysis")
    return state


def observe(state: CanaryState, canary: Figures, baseline: Figures) -> CanaryState:
    """Add a report's figures to the current step's (only while progressing).
    ``moved`` is kept: it is the last decision's, which the driver may not have
    published yet."""
    if state.state != PROGRESSING:
        return state
    return replace(state, canary=state.canary + canary, baseline=state.baseline + baseline)


def advance(rollout: RolloutConfig, state: CanaryState, now: float) -> CanaryState:
    """The decision of one control tick on the current step's figures so far."""
    if state.state != PROGRESSING:
        return replace(state, moved=False) if state.moved else state
    canary, baseline, need = state.canary, state.baseline, rollout.min_requests
    if canary.answered >= need:
        breach = _breach(rollout, canary, baseline)
        if breach:
            return replace(state, state=ROLLED_BACK, reason=breach, moved=True)
    elapsed = now - state.step_started_at
    here = f"step {state.step} ({rollout.steps[state.step]:g} %)"
    if elapsed < rollout.interval_s:
        return replace(state, moved=False) if state.moved else state
    if canary.answered < need:
        return replace(state, moved=False, reason=f"{here} waits for {need} canary answers, has {canary.answered} "
                                                  f"after {elapsed:.0f} s")
    held = f"{here} held {elapsed:.0f} s: {_compare(canary, baseline)}"
    nxt = state.step + 1
    if nxt >= len(rollout.steps):
        return replace(state, state=PROMOTED, reason=f"{held}; the last step passed: promoted", moved=True)
    fresh = CanaryState(state.fingerprint, nxt, PROGRESSING, now, Figures(), Figures(), moved=True,
                        reason=f"{held}; on to step {nxt} ({rollout.steps[nxt]:g} %)")
    if rollout.steps[nxt] >= 100:       # no baseline left to compare against
        return replace(fresh, state=PROMOTED, reason=f"{held}; at 100 %: promoted")
    return fresh


def _breach(rollout: RolloutConfig, canary: Figures, baseline: Figures) -> str:
    """Why the canary fails the comparison, or "" when it does not."""
    if canary.error_rate > baseline.error_rate + rollout.max_error_rate:
        return (f"canary error rate {canary.error_rate:.2f} > baseline {baseline.error_rate:.2f} "
                f"+ {rollout.max_error_rate:.2f} over {canary.answered} answers")
    c95, b95 = canary.p95_ms, baseline.p95_ms
    if (c95 is not None and b95 is not None and b95 > 0 and baseline.answered >= rollout.min_requests
            and c95 / b95 > rollout.max_p95_ratio):
        return (f"canary p95 {c95:.1f} ms > {rollout.max_p95_ratio:g} x baseline {b95:.1f} ms "
                f"({c95 / b95:.2f}x) over {canary.answered} and {baseline.answered} answers")
    return ""


def _compare(canary: Figures, baseline: Figures) -> str:
    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f}"
    return (f"error {canary.error_rate:.2f} vs {baseline.error_rate:.2f}, "
            f"p95 {ms(canary.p95_ms)} vs {ms(baseline.p95_ms)} ms")


def weights(rollout: RolloutConfig, state: CanaryState, declared: Mapping[str, float]) -> dict[str, float]:
    """The A/B weights in percent (summing to 100) the routers should draw by: the
    canary at its step and the other variants sharing the rest by their declared
    weights; rolled back, the canary at 0 and the others as declared. Shares of
    variants declared all at 0 are equal, so the weights are never all 0."""
    if state.state not in STATES:
        raise ValueError(f"state: must be one of {STATES}, got {state.state!r}")
    others = {v: w for v, w in declared.items() if v != rollout.canary}
    if not others:                      # nothing to share with (the config requires a baseline)
        return {rollout.canary: 100.0}
    share = 0.0 if state.state == ROLLED_BACK else float(rollout.steps[state.step])
    out = _spread(others, 100.0 - share)
    out[rollout.canary] = share
    return {v: out[v] for v in (*declared, rollout.canary) if v in out}     # in the declared order


def _spread(declared: Mapping[str, float], total: float) -> dict[str, float]:
    weight_sum = sum(declared.values())
    if weight_sum <= 0:
        return {v: total / len(declared) for v in declared}
    return {v: total * w / weight_sum for v, w in declared.items()}
