"""Circuit breaker per component (``model:variant``), with the clock passed in.

    closed --failure_threshold consecutive failures--> open
    open   --cool_down_s elapsed-----------------------> half-open   (lazily, on the next call)
    half-open: at most half_open_probes requests in flight at once;
               a probe success -> closed, a probe failure -> open (a new cool-down)

While open the router answers UNAVAILABLE at once with ``retry_after_ms`` (the time
left in the cool-down) instead of queueing requests for a component that fails.

What counts as a failure (``classify``; the caller reports the verdict):

* failure - UNAVAILABLE (no replica reachable, connection refused, draining
  everywhere), DEADLINE_EXCEEDED (a timeout is the most common sign of a sick
  component: hung engine, GPU stall), INTERNAL / UNKNOWN / DATA_LOSS (the replica
  broke while handling a request), UNIMPLEMENTED (the replicas do not serve what
  the table says: a bad rollout keeps failing until fixed).
* success - OK, and the errors that prove the component answered sensibly about
  a bad request: INVALID_ARGUMENT, NOT_FOUND, OUT_OF_RANGE, FAILED_PRECONDITION,
  ALREADY_EXISTS, PERMISSION_DENIED, UNAUTHENTICATED. These never count as
  failures: one client sending garbage must not cut everyone off.
* neutral - no verdict, release the permit: CANCELLED (the caller left) and
  ABORTED, and RESOURCE_EXHAUSTED from a replica. Overload is not breakage: the
  queue, the in-flight cap, spill-over and the autoscaler deal with it, and
  opening the breaker on a full queue would turn a partial overload into a full
  outage for cool_down_s. Outlier ejection makes the same call per replica.

A DEADLINE_EXCEEDED that happened because the *caller's* deadline was already
nearly spent (less than the component normally needs) says nothing about the
component; the caller should ``release`` rather than report a failure for it.

Limitation: ``try_acquire`` returns a bool, not a per-call permit, so outcomes
are not tied to the state they were admitted in. Outcomes reported while open are
ignored; in half-open an outcome counts as a probe verdict only while a probe is
in flight, so a straggler admitted before the breaker opened can, rarely, stand
in for the probe (it reflects the same component, so this errs mildly).
"""
from __future__ import annotations

import enum
import math

from cmesh.config import BreakerConfig


class State(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Verdict(str, enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    NEUTRAL = "neutral"


_FAILURE_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN", "DATA_LOSS",
                            "UNIMPLEMENTED"})
_NEUTRAL_CODES = frozenset({"CANCELLED", "ABORTED", "RESOURCE_EXHAUSTED"})


def classify(code_name: str) -> Verdict:
    """The breaker verdict for a call that ended with gRPC status ``code_name``
    (``grpc.StatusCode.X.name``). Unrecognised names are neutral."""
    if code_name in _FAILURE_CODES:
        return Verdict.FAILURE
    if code_name in _NEUTRAL_CODES:
        return Verdict.NEUTRAL
    if code_name in ("OK", "INVALID_ARGUMENT", "NOT_FOUND", "OUT_OF_RANGE", "FAILED_PRECONDITION",
                     "ALREADY_EXISTS", "PERMISSION_DENIED", "UNAUTHENTICATED"):
        return Verdict.SUCCESS
    return Verdict.NEUTRAL


def component_key(model: str, variant: str) -> str:
    return f"{model}:{variant}"


class CircuitBreaker:
    def __init__(self, config: BreakerConfig) -> None:
        self.config = config
        self._state = State.CLOSED
        self._failures = 0             # consecutive, while closed
        self._opened_at = 0.0
        self._probes = 0               # in flight, while half-open

    def state(self, now: float) -> State:
        if self._state is State.OPEN and now >= self._opened_at + self.config.cool_down_s:
            self._state = State.HALF_OPEN
            self._probes = 0
        return self._state

    def try_acquire(self, now: float) -> bool:
        """May a request go to the component now? In half-open a True is a probe
        permit: the caller must end it with on_success, on_failure or release."""
        state = self.state(now)
        if state is State.CLOSED:
            return True
        if state is State.HALF_OPEN and self._probes < self.config.half_open_probes:
            self._probes += 1
            return True
        return False

    def on_success(self, now: float) -> None:
        state = self.state(now)
        if state is State.CLOSED:
            self._failures = 0
        elif state is State.HALF_OPEN and self._probes:
            self._close()
        # open: a straggler admitted before the breaker opened; the decision stands

    def on_failure(self, now: float) -> None:
        state = self.state(now)
        if state is State.CLOSED:
            self._failures += 1
            if self._failures >= self.config.failure_threshold:
                self._open(now)
        elif state is State.HALF_OPEN and self._probes:
            self._open(now)

    def on_outcome(self, now: float, code_name: str) -> None:
        """Report a finished call by its status code name (see ``classify``)."""
        verdict = classify(code_name)
        if verdict is Verdict.SUCCESS:
            self.on_success(now)
        elif verdict is Verdict.FAILURE:
            self.on_failure(now)
        else:
            self.release(now)

    def release(self, now: float) -> None:
        """A permitted call ended without a verdict (cancelled, overloaded): free
        its probe slot, if it held one, so another probe may go."""
        if self.state(now) is State.HALF_OPEN and self._probes:
            self._probes -= 1

    def retry_after_ms(self, now: float) -> int:
        """How long a refused caller should wait: the rest of the cool-down while
        open; while half-open with every probe out, a whole cool-down (what a
        failing probe would cost; a succeeding one closes sooner); 0 when closed."""
        state = self.state(now)
        if state is State.OPEN:
            return max(1, math.ceil((self._opened_at + self.config.cool_down_s - now) * 1000))
        if state is State.HALF_OPEN and self._probes >= self.config.half_open_probes:
            return max(1, math.ceil(self.config.cool_down_s * 1000))
        return 0

    def _open(self, now: float) -> None:
        self._state = State.OPEN
        self._opened_at = now
        self._failures = 0
        self._probes = 0

    def _close(self) -> None:
        self._state = State.CLOSED
        self._failures = 0
        self._probes = 0


class BreakerRegistry:
    """One breaker per component, created on first use; callers pass ``now`` to it."""

    def __init__(self, config: BreakerConfig) -> None:
        self.config = config
        self._breakers: dict[str, CircuitBreaker] = {}

    def get(self, component: str) -> CircuitBreaker:
        breaker = self._breakers.get(component)
        if breaker is None:
            breaker = self._breakers[component] = CircuitBreaker(self.config)
        return breaker

    def apply(self, config: BreakerConfig) -> None:
        """New thresholds for every breaker; each keeps its state (open stays open)."""
        self.config = config
        for breaker in self._breakers.values():
            breaker.config = config
