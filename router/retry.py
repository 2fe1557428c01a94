"""Retry policy: which failures to retry, when, and how many retries overall.

A retry is only safe and useful when (DESIGN.md §4):

* no response byte has reached the caller yet (a streamed answer cannot be
  replayed; the caller tracks this and passes ``response_started``);
* the status says "this replica could not take it, another may": UNAVAILABLE
  (unreachable, draining) and RESOURCE_EXHAUSTED from a replica's full queue;
* the attempt limit (``RetryConfig.max_attempts``, first try included) and the
  remaining deadline leave room, after the backoff, for another try;
* the retry budget allows it.

The budget is what stops retries from multiplying load during an outage (every
client retrying three times makes a struggling mesh see 3x traffic). It follows
Finagle's and Envoy's retry budgets: every first attempt deposits, every retry
withdraws, and over a trailing window retries may reach ``ratio`` x requests or,
when traffic is low, a floor of ``min_retries_per_s`` x window, whichever is
larger. The window is bucketed (``buckets`` slots plus the current one), so its
span is between ``window_s`` and ``window_s`` + one bucket; memory is O(buckets).

Guarantee, for any sequence of calls and any clock that does not go backwards:
over a run of T seconds with N first attempts, retries granted R satisfy

    R <= ratio * N + min_retries_per_s * (T + window_s)

(and when the floor is 0, R <= ratio * N exactly). Why: take the last granted
retry; its check window holds at most max(ratio x requests in it, floor x window)
retries. The latest retry before that window starts defines the next, earlier
window, and so on; these windows are disjoint (so no request is counted twice)
and their ends are more than ``window_s`` apart (so at most T/window_s + 1 of
them). A floor that is a *rate* cannot be bounded by floor x window alone over
runs longer than a window: at one request per second that all fail, the floor is
precisely what lets them be retried.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from cmesh.config import RetryConfig

_EPS = 1e-9
# A replica's own full queue (cmesh.errors.ResourceExhausted.reason): another
# replica may have room. Other RESOURCE_EXHAUSTED causes (a message over the size
# limit, a tenant over its rate) fail the same way anywhere.
_RETRYABLE_EXHAUSTED_REASONS = (None, "", "queue_full")


def is_retryable(code_name: str, *, reason: str | None = None, response_started: bool = False) -> bool:
    """May a call that failed with ``code_name`` (``grpc.StatusCode.X.name``) be
    tried again on another replica? ``reason`` is the ``ComponentError.reason``
    of the failure when it carried one; without one, a RESOURCE_EXHAUSTED is
    taken to be a full queue (the budget bounds the cost of being wrong)."""
    if response_started:
        return False
    if code_name == "UNAVAILABLE":
        return True
    return code_name == "RESOURCE_EXHAUSTED" and reason in _RETRYABLE_EXHAUSTED_REASONS


class RetryBudget:
    """Retries allowed over a trailing window, as a fraction of requests, with a
    floor for low traffic. ``deposit`` on every first attempt; ``try_withdraw``
    before every retry (a refused withdrawal costs nothing)."""

    def __init__(self, ratio: float, min_retries_per_s: float,
                 clock: Callable[[], float] = time.monotonic, *,
                 window_s: float = 10.0, buckets: int = 10) -> None:
        if ratio < 0 or min_retries_per_s < 0:
            raise ValueError("ratio and min_retries_per_s: must be >= 0")
        if window_s <= 0 or buckets < 1:
            raise ValueError("window_s: must be > 0 and buckets >= 1")
        self.ratio = ratio
        self.min_retries_per_s = min_retries_per_s
        self.window_s = window_s
        self._clock = clock
        self._width = window_s / buckets
        self._slots = buckets + 1              # the current, partial bucket plus `buckets` full ones
        self._requests = [0] * self._slots
        self._retries = [0] * self._slots
        self._request_sum = 0
        self._retry_sum = 0
        self._head: int | None = None          # absolute index of the current bucket

    @classmethod
    def from_config(cls, config: RetryConfig, clock: Callable[[], float] = time.monotonic,
                    **kw) -> "RetryBudget":
        return cls(config.budget_ratio, config.min_retries_per_s, clock, **kw)

    @property
    def floor(self) -> float:
        return self.min_retries_per_s * self.window_s

    def deposit(self, now: float | None = None) -> None:
        slot = self._advance(self._clock() if now is None else now)
        self._requests[slot] += 1
        self._request_sum += 1

    def try_withdraw(self, now: float | None = None) -> bool:
        slot = self._advance(self._clock() if now is None else now)
        if self._retry_sum + 1 > self._allowance() + _EPS:
            return False
        self._retries[slot] += 1
        self._retry_sum += 1
        return True

    def available(self, now: float | None = None) -> int:
        """Retries the budget would grant now (for metrics)."""
        self._advance(self._clock() if now is None else now)
        return max(0, math.floor(self._allowance() + _EPS) - self._retry_sum)

    def window_counts(self, now: float | None = None) -> tuple[int, int]:
        """(requests, retries) in the current window."""
        self._advance(self._clock() if now is None else now)
        return self._request_sum, self._retry_sum

    def _allowance(self) -> float:
        return max(self.ratio * self._request_sum, self.floor)

    def _advance(self, now: float) -> int:
        index = math.floor(now / self._width)
        if self._head is None:
            self._head = index
        elif index > self._head:
            steps = min(index - self._head, self._slots)
            for k in range(1, steps + 1):
                slot = (self._head + k) % self._slots
                self._request_sum -= self._requests[slot]
                self._retry_sum -= self._retries[slot]
                self._requests[slot] = self._retries[slot] = 0
            self._head = index
        # A clock that steps back stays in the current bucket: the window never
        # re-admits what it has already counted.
        return self._head % self._slots


@dataclass(frozen=True)
class RetryDecision:
    retry: bool
    backoff_s: float = 0.0
    reason: str = ""       # why not (a metric label), or "retry"


class RetryPolicy:
    """Decides, after a failed attempt, whether and when to try another replica.

    Backoff is ``backoff_ms`` x 2^(attempt-1), capped at ``max_backoff_s``; with an
    ``rng`` it is jittered to [50%, 100%] of that, so callers that failed together
    do not come back together."""

    def __init__(self, config: RetryConfig, budget: RetryBudget | None = None, *,
                 rng: random.Random | None = None, max_backoff_s: float = 1.0) -> None:
        self.config = config
        self.budget = budget if budget is not None else RetryBudget.from_config(config)
        self._rng = rng
        self.max_backoff_s = max_backoff_s

    def on_request(self, now: float | None = None) -> None:
        """Call once per request, at its first attempt: it funds the budget."""
        self.budget.deposit(now)

    def backoff_s(self, attempt: int) -> float:
        backoff = min(self.max_backoff_s, self.config.backoff_ms / 1000.0 * 2 ** min(attempt - 1, 30))
        if self._rng is not None:
            backoff *= 0.5 + 0.5 * self._rng.random()
        return backoff

    def decide(self, attempt: int, code_name: str, response_started: bool, remaining_s: float,
               now: float | None = None, *, reason: str | None = None) -> RetryDecision:
        """``attempt`` is the 1-based number of the attempt that just failed with
        ``code_name``; ``remaining_s`` is what is left of the request's deadline.
        The budget is only drawn on when every other check passed."""
        if attempt < 1:
            raise ValueError(f"attempt: must be >= 1, not {attempt}")
        if response_started:
            return RetryDecision(False, reason="response_started")
        if not is_retryable(code_name, reason=reason):
            return RetryDecision(False, reason="not_retryable")
        if attempt >= self.config.max_attempts:
            return RetryDecision(False, reason="max_attempts")
        backoff = self.backoff_s(attempt)
        if remaining_s <= backoff:
            return RetryDecision(False, reason="deadline")
        if not self.budget.try_withdraw(now):
            return RetryDecision(False, reason="budget")
        return RetryDecision(True, backoff_s=backoff, reason="retry")
