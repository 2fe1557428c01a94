"""Trend-ahead scaling: a rising load, projected one cold start ahead.

A reactive policy asks for replicas once the load is there, and they serve a
cold start later: an LLM's 150 s, in which a ramp keeps rising and queues. On
the paper's diurnal day (7.5-minute ramps, ``loadtest.sim_paper``) that backlog
then panics the pool to several times what the peak needs. So, per model::

    slope     = least-squares slope of the arrival rate over the stable window
    W         = min over the panic and stable windows of concurrency / rate
                                                        time a call spends (Little)
    horizon   = trend_lead_factor x the model's measured cold start
    forecast  = min(load + slope x horizon x W,  max_scale_up_rate x load)

where ``load`` is the current (panic-window) concurrency. The policy
(``autoscaler.policy.decide``) scales to at least the forecast, in both windows,
as it does for graph-ahead's prediction.

Why these choices:

* the *arrival rate*, not the concurrency: concurrency also rises when the pool
  is short and a backlog builds, which is the autoscaler's own doing;
  extrapolating it would compound exactly the overshoot the rate limit guards
  against. Arrivals are what the clients send, whatever the pool's size;
* least squares over the whole stable window, with its standard error: Poisson
  arrivals at 25 per second wobble by 5 a second, and a slope counts only when
  it is ``trend_min_z`` standard errors above zero, so a flat load's noise
  does not scale (at z = 3 about one fit in 400 of a flat Poisson load
  passes; ``tests/test_autoscaler_trend.py``);
* only while the short (panic) window's rate is above the stable window's: the
  load is rising *now*. A burst that has passed still leaves a positive slope
  across the window, and projecting it would hold replicas for load that left;
* W the smaller of the two windows' (Little's time includes queueing): a
  backlog inflates it, and the stable window remembers a backlog for a minute
  after it cleared (on the diurnal ramp, a 30 s W against 4.4 s calls
  projected 2,573 in flight where 502 were; ``loadtest.sim_paper``);
* only up: no forecast while the load falls or holds (scale-down stays on the
  measured load), never below the current load, and at most
  ``max_scale_up_rate`` x it (a step, fitted as a line, has a steep slope).

Pure: no I/O, no clock; ``ScalingContext.from_window`` calls it for the
controller and the simulator alike.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from autoscaler.window import MetricsWindow
    from cmesh.config import AutoscalerConfig

# Fewer whole buckets than this (a model seen for a few seconds): no trend.
MIN_POINTS = 10


@dataclass(frozen=True)
class Trend:
    """A straight line through a rate series: its slope (per second, per
    second) and that slope's standard error."""

    slope: float
    stderr: float
    points: int

    def significant(self, z: float) -> bool:
        """Rising by more than ``z`` standard errors (a zero error, a perfect line,
        needs only a positive slope)."""
        return self.slope > 0 and self.slope > z * self.stderr


def fit(counts: Sequence[float], bucket_s: float) -> Trend | None:
    """Least squares through per-bucket arrival counts (oldest first, one bucket
    each ``bucket_s``); None with fewer than ``MIN_POINTS`` buckets."""
    n = len(counts)
    if n < MIN_POINTS or bucket_s <= 0:
        return None
    rates = [c / bucket_s for c in counts]
    mean_x = (n - 1) / 2.0
    mean_y = sum(rates) / n
    sxx = n * (n * n - 1) / 12.0                       # sum of (i - mean_x)^2 for i = 0..n-1
    sxy = sum((i - mean_x) * (y - mean_y) for i, y in enumerate(rates))
    per_bucket = sxy / sxx
    ssr = sum((y - mean_y - per_bucket * (i - mean_x)) ** 2 for i, y in enumerate(rates))
    stderr = math.sqrt(ssr / (n - 2) / sxx)
    return Trend(slope=per_bucket / bucket_s, stderr=stderr / bucket_s, points=n)


def forecast(trend: Trend | None, *, load: float, time_in_system_s: float, horizon_s: float,
             min_z: float, cap: float) -> float | None:
    """The concurrency ``horizon_s`` ahead (see the module docstring), or None
    when there is no significant rise to project."""
    if trend is None or horizon_s <= 0 or time_in_system_s <= 0 or load <= 0:
        return None
    if not trend.significant(min_z):
        return None
    return min(load + trend.slope * horizon_s * time_in_system_s, cap * load)


def window_forecast(window: "MetricsWindow", model: str, now: float, config: "AutoscalerConfig",
                    lead_s: float | None, load: float | None,
                    service_s: float | None = None) -> float | None:
    """:func:`forecast` from the autoscaler's metrics window; None when off, when
    the model's cold start is unknown, or when its load is not rising now.
    ``service_s`` (backlog-aware scaling: the time in system measured while the
    pool kept up) replaces Little's time from the windows, which a backlog
    inflates."""
    if not config.trend_ahead or not lead_s or not load:
        return None
    stable_s, panic_s = config.stable_window_s, config.panic_window_s
    s_span, p_span = window.span(model, now, stable_s), window.span(model, now, panic_s)
    if s_span <= 0 or p_span <= 0:
        return None
    stable_rate = window.arrivals(model, now, stable_s) / s_span
    panic_rate = window.arrivals(model, now, panic_s) / p_span
    if stable_rate <= 0 or panic_rate <= stable_rate:
        return None                                 # not rising now: the measured load decides
    concurrency = window.average_concurrency(model, now, stable_s) or 0.0
    time_in_system = service_s or min(concurrency / stable_rate, load / panic_rate)
    trend = fit(window.arrival_counts(model, now, stable_s), window.bucket_s)
    return forecast(trend, load=load, time_in_system_s=time_in_system,
                    horizon_s=config.trend_lead_factor * lead_s, min_z=config.trend_min_z,
                    cap=config.max_scale_up_rate)


def expected_cold_start(measured: Iterable[float | None], previous: float | None = None) -> float | None:
    """The cold start to plan with: the median of the replicas' own measurements
    (zero and None are no measurement), else the last one known (a model scaled
    to zero has no replica to ask)."""
    known = [m for m in measured if m]
    return statistics.median(known) if known else previous
