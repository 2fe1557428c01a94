"""Prometheus metrics of one router, on a registry of its own."""
from __future__ import annotations

from collections import Counter as TallyCounter
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self._children: dict = {}
        self._queue_depth = Gauge("cmesh_router_queue_depth", "Requests waiting in the router",
                                  ("model", "latency_class"), registry=r)
        self._queue_wait = Histogram("cmesh_router_queue_wait_seconds", "Router queue time before dispatch",
                                     ("model", "latency_class"), buckets=LATENCY_BUCKETS, registry=r)
        self._dispatch = Counter("cmesh_router_dispatch_total", "Requests sent to a replica",
                                 ("model", "pool"), registry=r)
        self._spill = Counter("cmesh_router_spillover_total", "Dispatches spilled to the serverless pool",
                              ("model",), registry=r)
        self._cold = Counter("cmesh_router_cold_start_waits_total",
                             "Times a model had no replica and requests were held", ("model",), registry=r)
        self._held = Gauge("cmesh_router_held_requests", "Requests held for a first replica", ("model",),
                           registry=r)
        self._shed = Counter("cmesh_router_shed_total", "Requests refused or evicted by a full queue",
                             ("model", "latency_class"), registry=r)
        self._breaker = Gauge("cmesh_router_breaker_state", "0 closed, 1 half-open, 2 open", ("component",),
                              registry=r)
        self._retries = Counter("cmesh_router_retries_total", "Retried attempts", ("model", "code"), registry=r)
        self._retry_denied = Counter("cmesh_router_retries_denied_total", "Retries refused (budget, "
                                     "deadline, response started)", ("model", "reason"), registry=r)
        self._latency = Histogram("cmesh_router_request_seconds", "End-to-end latency in the router",
                                  ("model", "variant", "latency_class", "status"), buckets=LATENCY_BUCKETS,
                                  registry=r)
        self._masked = Counter("cmesh_router_pii_masked_total", "PII spans masked by the trust layer",
                               ("kind",), registry=r)
        self._ejections = Counter("cmesh_router_outlier_ejections_total", "Replica ejections", ("model",),
                                  registry=r)
        # Metering through a Redis outage (router.meter_spool).
        self._meter_spooled = Counter("cmesh_metering_spooled_total",
                                      "Metering events spooled because the store was unavailable", registry=r)
        self._meter_replayed = Counter("cmesh_metering_replayed_total",
                                       "Spooled metering events the store has since confirmed", registry=r)
        self._meter_dropped = Counter("cmesh_metering_dropped_total", "Metering events lost (spool full, "
                                      "or still spooled when the router stopped)", registry=r)
        self._meter_depth = Gauge("cmesh_metering_spool_depth", "Metering events waiting in the spool",
                                  registry=r)

    def queue_depth(self, model: str, entries: Iterable) -> None:
        counts = TallyCounter(e.latency_class for e in entries)
        for cls in ("interactive", "batch"):
            self._queue_depth.labels(model, cls).set(counts.get(cls, 0))

    def _child(self, metric, *labels: str):
        # labels() takes a lock and builds keys on every call; the hot path reuses children.
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def dispatched(self, model: str, pool: str, spilled: bool, queue_s: float, latency_class: str) -> None:
        self._child(self._dispatch, model, pool).inc()
        self._child(self._queue_wait, model, latency_class).observe(queue_s)
        if spilled:
            self._child(self._spill, model).inc()

    def cold_start_wait(self, model: str) -> None:
        self._cold.labels(model).inc()

    def holding(self, model: str, holding: bool, count: int) -> None:
        self._held.labels(model).set(count if holding else 0)

    def shed(self, model: str, latency_class: str) -> None:
        self._shed.labels(model, latency_class).inc()

    def breaker(self, component: str, state: str) -> None:
        self._child(self._breaker, component).set(BREAKER_STATES.get(state, 0))

    def retry(self, model: str, code: str) -> None:
        self._retries.labels(model, code).inc()

    def retry_denied(self, model: str, reason: str) -> None:
        self._retry_denied.labels(model, reason).inc()

    def request(self, model: str, variant: str, latency_class: str, status: str, seconds: float) -> None:
        self._child(self._latency, model, variant, latency_class, status).observe(seconds)

    def masked(self, counts: dict[str, int]) -> None:
        for kind, n in counts.items():
            if n:
                self._masked.labels(kind).inc(n)

    def ejected(self, model: str) -> None:
        self._ejections.labels(model).inc()

    def metering_spooled(self, n: int) -> None:
        self._meter_spooled.inc(n)

    def metering_replayed(self, n: int) -> None:
        self._meter_replayed.inc(n)

    def metering_dropped(self, n: int) -> None:
        self._meter_dropped.inc(n)

    def metering_spool_depth(self, depth: int) -> None:
        self._meter_depth.set(depth)

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0
