"""The router core's small stages, in the order a call meets them:
admission → A/B variant → breaker → (trust layer, ``router.trust_io``) →
(attempts, ``router.attempts``) → metering. Each is testable on its own;
``router.core.RouterCore`` only composes them.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import random
import uuid
from collections import Counter
from collections.abc import Callable

from cmesh.config import MeshConfig, ModelConfig
from cmesh.errors import MeshError, NotFound, Unavailable, quote
from cmesh.tensors import check_request
from router.abtest import choose_variant
from router.breaker import BreakerRegistry, CircuitBreaker
from router.call import Call
from router.metering import Meter, MeterEvent
from router.metrics import RouterMetrics
from router.variant_stats import VariantStats

log = logging.getLogger(__name__)


class Admission:
    """The model exists, the call has its ids and class, and every declared shape
    holds against the bytes present and the limits, before anything is decoded or
    allocated: the caller's bad input never reaches a breaker. Counts arrivals for
    the load reports."""

    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self.arrivals: Counter = Counter()          # per model, since the last load report
        # Request ids for calls that bring none: unique per router, cheaper than uuid4.
        self._id_prefix = uuid.uuid4().hex[:12]
        self._id_counter = itertools.count(1)

    def model(self, call: Call) -> ModelConfig:
        cfg = self.config.models.get(call.model)
        if cfg is None:
            raise NotFound(f"unknown model {quote(call.model)}", component=call.model, pipeline=call.pipeline)
        call.latency_class = call.latency_class or cfg.latency_class
        call.request_id = call.request_id or self.new_id()
        self.arrivals[call.model] += 1
        return cfg

    def check(self, call: Call) -> list[int]:
        """The element count of every input (the trust layer reads them)."""
        return check_request(call.request, self.config.server.limits)

    def new_id(self) -> str:
        return f"{self._id_prefix}-{next(self._id_counter):x}"

    def take_arrivals(self) -> Counter:
        arrivals, self.arrivals = self.arrivals, Counter()
        return arrivals


class Variants:
    """Component-level A/B: a pinned version, or a draw by the model's weights,
    sticky per session and salted by the model so that one session's draws in two
    experiments are independent (``router.abtest``)."""

    def __init__(self, config: MeshConfig, rng: random.Random) -> None:
        self._rng = rng
        self.apply(config)

    def apply(self, config: MeshConfig) -> None:
        # Configs are never mutated: the weights are computed once per model (per apply).
        self._weights = {name: {v: s.weight for v, s in cfg.variant_sources().items()}
                         for name, cfg in config.models.items()}

    def pick(self, call: Call) -> str:
        weights = self._weights[call.model]
        variant = call.version or choose_variant(weights, call.session or None, self._rng, salt=call.model)
        if variant not in weights:
            raise NotFound(f"model {call.model!r} has no variant {quote(variant)}; variants: {sorted(weights)}",
                           component=call.model, pipeline=call.pipeline)
        call.accounting.variant = variant
        return variant


class Breakers:
    """One breaker per component (model:variant). Only what a backend answered
    judges the component (``breaker.classify``); the router's own errors (queue
    full, no replica yet, the caller's deadline) release the slot unjudged."""

    def __init__(self, registry: BreakerRegistry, metrics: RouterMetrics, clock: Callable[[], float]) -> None:
        self.registry = registry
        self.metrics = metrics
        self._now = clock

    def enter(self, component: str, call: Call) -> CircuitBreaker:
        breaker = self.registry.get(component)
        now = self._now()
        if not breaker.try_acquire(now):
            self.metrics.breaker(component, breaker.state(now))
            err = Unavailable(f"circuit breaker for {component} is open after repeated failures",
                              component=component, pipeline=call.pipeline,
                              retry_after_ms=breaker.retry_after_ms(now))
            err.reason = "breaker_open"
            raise err
        return breaker

    def verdict(self, breaker: CircuitBreaker, component: str, outcome: str | None) -> None:
        now = self._now()
        if outcome is None:
            breaker.release(now)
        else:
            breaker.on_outcome(now, outcome)
        self.metrics.breaker(component, breaker.state(now))


class Metering:
    """Every call is metered exactly once, by its request id, off the hot path: one
    consumer task records the events; the request never waits on the meter. Calls
    that reached a variant also count in ``stats``, for the load reports' per-variant
    figures (the autoscaler's canary analysis)."""

    def __init__(self, meter: Meter, metrics: RouterMetrics, clock: Callable[[], float],
                 wall: Callable[[], float], stats: VariantStats | None = None) -> None:
        self.meter = meter
        self.metrics = metrics
        self.stats = stats if stats is not None else VariantStats()
        self._now = clock
        self._wall = wall
        self._queue: asyncio.Queue[MeterEvent] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def record(self, call: Call, status: str, started_at: float, judged: bool = True) -> None:
        """``judged``: False when the caller's own deadline ended the call, which says
        nothing about the variant (the canary analysis leaves it out)."""
        acc = call.accounting
        latency_class = call.latency_class or "interactive"
        elapsed = self._now() - started_at
        self.metrics.request(call.model, acc.variant, latency_class, status, elapsed)
        if acc.variant and judged:      # refused before a variant was drawn: nothing to compare
            self.stats.observe(call.model, acc.variant, status, elapsed)
        try:
            event = MeterEvent(request_id=call.request_id, tenant=call.principal.tenant, pipeline=call.pipeline,
                               model=call.model, variant=acc.variant, latency_class=latency_class, status=status,
                               input_tokens=acc.input_tokens, output_tokens=acc.output_tokens,
                               compute_s=acc.compute_ms / 1000.0, external=acc.external, timestamp=self._wall())
        except ValueError as exc:       # a replica's bad accounting must not fail the request
            log.error("cannot meter %s: %s", call.request_id, exc)
            return
        self._queue.put_nowait(event)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._consume(), name="metering")

    async def _consume(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self.meter.record(event)
            except (MeshError, ValueError) as exc:   # metering must never fail what it meters
                log.error("metering failed for %s: %s", event.request_id, exc)
            finally:
                self._queue.task_done()

    async def flush(self) -> None:
        """Wait until every event so far is recorded."""
        await self._queue.join()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
