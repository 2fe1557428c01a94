"""Backlog-aware scale-up: size a pool for the arrival rate, not for its queue.

The policy scales on concurrency (in flight + queued), which is right while
the pool keeps up: by Little's law it is the arrival rate times the time a
call spends in the system. When the pool falls short, the queue grows by the
shortfall every second, and concurrency grows with it, although the queue is a
stock of work, not a flow. With a 150 s cold start (the paper's LLM) every
tick while replicas start sees a longer queue and asks for more replicas: on
``loadtest.sim_paper``'s diurnal ramp the LLM pool reached 198 replicas for a
plateau that needs 53, and they then drained a backlog in seconds that was
already 150 s old. So, with ``autoscaler.backlog_drain_s`` (D), per model::

    S        = time a call spends in the system while the pool keeps up
               (concurrency / arrival rate over the panic window, at ticks
               with no replica starting and nothing held; remembered)
    steady   = arrival rate x S                 the load the flow itself makes
    backlog  = max(0, load - steady)            calls beyond it: a queue
    load'    = steady + backlog x S / D         the queue's work spread over D

``load'`` is the concurrency that serves the arrivals and drains the queue
within D seconds once the replicas asked for serve (Little again:
``backlog / D`` calls per second, each in the system for ``S``), and scale-up
goes at most to it. D is a latency choice, not a constant of nature: a small
D drains at once and provisions nearly for the queue's length (as without
it); a large one provisions little for a queue that then waits longer. On the
paper's diurnal day (``loadtest.sim_paper``, a quarter of its rate), D = 7.5,
15, 30 and 150 s gave LLM peaks of 37, 23, 17 and 12 replicas against 50
without, at 0.5 %, 3.5 %, 5 % and 6.4 % fewer replica-seconds and a P95 of
4.8, 5.0, 5.4 and 18 s against 4.7 s.

Why these choices:

* S is measured only while the pool keeps up (nothing starting, nothing held):
  while it is short, concurrency / rate is inflated by the very queue it is
  meant to see through. It is remembered (an exponential average over such
  ticks), as the cold start is, so a short pool still has one;
* the arrival rate over the panic window: what the clients send now,
  whatever the pool's size (the trend forecast, ``autoscaler.trend``, uses the
  same S for the same reason);
* it only ever slows scale-up (``load' <= load``, and never below the current
  pool); with no S known yet the load is used as it is.

Pure: no I/O, no clock; the controller remembers S per model and
``ScalingContext.from_window`` folds the result into the context.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from autoscaler.window import MetricsWindow

# Weight of one tick's observation in the remembered service time (~10 ticks' memory).
SERVICE_WEIGHT = 0.1


def panic_rate(window: "MetricsWindow", model: str, now: float, panic_s: float) -> float | None:
    """Arrivals per second over the panic window's whole buckets (the one still
    filling, and one the window only partly covers, would bias a short window's
    rate by a bucket); None without a whole bucket."""
    counts = window.arrival_counts(model, now, panic_s)
    if not counts:
        return None
    return sum(counts) / (len(counts) * window.bucket_s)


def observe_service(previous: float | None, *, load: float | None, rate: float | None,
                    keeping_up: bool, weight: float = SERVICE_WEIGHT) -> float | None:
    """The remembered time in system after one tick: ``load / rate`` folded in
    when the pool keeps up and there is traffic, else ``previous`` unchanged."""
    if not keeping_up or not load or not rate or load <= 0 or rate <= 0:
        return previous
    seen = load / rate
    return seen if previous is None else previous + weight * (seen - previous)


def drain_load(load: float, *, rate: float | None, service_s: float | None,
               horizon_s: float | None) -> float:
    """The load to scale up to: the arrivals' own concurrency plus the backlog's
    work over ``horizon_s`` (D in the module docstring); ``load`` itself when
    any input is unknown."""
    if rate is None or not service_s or not horizon_s or service_s <= 0 or horizon_s <= 0:
        return load
    steady = rate * service_s
    backlog = load - steady
    if backlog <= 0:
        return load
    return min(load, steady + backlog * min(1.0, service_s / horizon_s))
