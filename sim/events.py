"""The discrete-event core: a heap of (time, seq, callback, args) and a virtual clock.

``seq`` breaks ties in scheduling order, so equal times run first-come first
served and a run is deterministic for its inputs. ``clock`` is the injected
clock every production component gets (``Controller(clock=...)``).

Arrivals, known in advance and sorted, do not go through the heap: ``feed``
gives the loop one ascending list of times and a callback that takes the
arrival's index, and ``run`` merges it with the heap (at equal times, heap
events first). That saves a push and a pop per request. Hot callers push with
``push(t, fn, args)`` (``t`` must not be in the past).
"""
from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any


class EventLoop:
    __slots__ = ("now", "_heap", "_seq", "events", "_feed", "_feed_fn", "_feed_i", "push")

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self._heap: list[tuple[float, int, Callable[..., Any], tuple]] = []
        self._seq = itertools.count()
        self.events = 0
        self._feed: Sequence[float] = ()
        self._feed_fn: Callable[[int], Any] | None = None
        self._feed_i = 0
        heap, seq, push = self._heap, self._seq, heapq.heappush
        # push(t, fn, args): the fast path of ``at`` for callers that know t >= now.
        self.push = lambda t, fn, args: push(heap, (t, next(seq), fn, args))

    def clock(self) -> float:
        return self.now

    def at(self, t: float, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` at virtual time ``t`` (never before now)."""
        heapq.heappush(self._heap, (t if t > self.now else self.now, next(self._seq), fn, args))

    def after(self, dt: float, fn: Callable[..., Any], *args: Any) -> None:
        self.at(self.now + dt, fn, *args)

    def every(self, period: float, fn: Callable[[], Any], start: float | None = None,
              until: float | None = None) -> None:
        """``fn()`` every ``period`` from ``start`` (default now + period) until ``until``."""
        def tick() -> None:
            fn()
            if until is None or self.now + period <= until:
                self.after(period, tick)

        self.at(self.now + period if start is None else start, tick)

    def feed(self, times: Sequence[float], fn: Callable[[int], Any]) -> None:
        """``fn(i)`` at ``times[i]`` for every i (ascending, none before now); one feed per loop."""
        if self._feed_fn is not None and self._feed_i < len(self._feed):
            raise RuntimeError("a feed is still running")
        self._feed, self._feed_fn, self._feed_i = times, fn, 0

    def run(self, until: float) -> None:
        heap, pop = self._heap, heapq.heappop
        feed, fn_feed, i = self._feed, self._feed_fn, self._feed_i
        n_feed = len(feed)
        next_feed = feed[i] if i < n_feed else math.inf
        n = 0
        while True:
            if heap and heap[0][0] <= next_feed:
                if heap[0][0] > until:
                    break
                t, _, fn, args = pop(heap)
                self.now = t
                fn(*args)
            else:
                if next_feed > until:
                    break
                self.now = next_feed
                j = i
                i += 1
                self._feed_i = i
                next_feed = feed[i] if i < n_feed else math.inf
                fn_feed(j)
            n += 1
        self._feed_i = i
        self.events += n
        if self.now < until:
            self.now = until

    def __len__(self) -> int:
        return len(self._heap) + len(self._feed) - self._feed_i
