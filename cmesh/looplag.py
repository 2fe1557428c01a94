"""Event-loop lag: how late a timer set for ``interval_s`` fires. A service whose
loop is blocked (a big regex, a huge allocation) serves nobody meanwhile; this
makes that visible as ``cmesh_event_loop_lag_seconds`` (histogram) and
``cmesh_event_loop_lag_max_seconds`` (the worst of the last 10-20 s: two
alternating windows, so a scrape sees a recent stall and an old one ages out)."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Gauge, Histogram

BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


class LoopLagProbe:
    def __init__(self, registry: CollectorRegistry | None = None, interval_s: float = 0.01,
                 clock: Callable[[], float] = time.perf_counter, window_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self.window_s = window_s
        self.max_lag_s = 0.0                   # since start (or since a caller reset it)
        self._window = [clock(), 0.0, 0.0]     # start of the current window, its max, the previous max
        self._clock = clock
        self._task: asyncio.Task | None = None
        self._hist = self._gauge = None
        if registry is not None:
            self._hist = Histogram("cmesh_event_loop_lag_seconds", "How late a timer on the event loop fired",
                                   buckets=BUCKETS, registry=registry)
            self._gauge = Gauge("cmesh_event_loop_lag_max_seconds",
                                "The worst event-loop lag of the last 10-20 s", registry=registry)

    def observe(self, lag_s: float) -> None:
        lag_s = max(0.0, lag_s)
        self.max_lag_s = max(self.max_lag_s, lag_s)
        window = self._window
        now = self._clock()
        if now - window[0] >= self.window_s:
            window[:] = [now, 0.0, window[1]]
        window[1] = max(window[1], lag_s)
        if self._gauge is not None:
            self._gauge.set(max(window[1], window[2]))
        if self._hist is not None:
            self._hist.observe(lag_s)

    async def run(self) -> None:
        while True:
            start = self._clock()
            await asyncio.sleep(self.interval_s)
            self.observe(self._clock() - start - self.interval_s)

    def start(self) -> "LoopLagProbe":
        self._task = asyncio.get_running_loop().create_task(self.run(), name="loop-lag")
        return self

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
