"""Prometheus metrics of one model server, on a registry of its own (so several
servers can live in one test process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        labels = ("model", "variant")
        self.queue_depth = Gauge("cmesh_model_queue_depth", "Requests waiting for a batch",
                                 labels, registry=r)
        self.in_flight = Gauge("cmesh_model_in_flight", "Requests accepted and not yet answered",
                               labels, registry=r)
        self.batch_size = Histogram("cmesh_model_batch_size", "Rows per engine call "
                                    "(decode steps for generative models)", labels,
                                    buckets=BATCH_BUCKETS, registry=r)
        self.compute_seconds = Histogram("cmesh_model_compute_seconds", "Engine time per batch",
                                         labels, buckets=TIME_BUCKETS, registry=r)
        self.queue_seconds = Histogram("cmesh_model_queue_seconds", "Time from arrival to first batch",
                                       labels, buckets=TIME_BUCKETS, registry=r)
        self.requests = Counter("cmesh_model_requests_total", "Requests by final status",
                                labels + ("status",), registry=r)
        self.by_pipeline = Counter("cmesh_model_pipeline_requests_total",
                                   "Requests by the pipeline and latency class they came with",
                                   labels + ("pipeline", "latency_class"), registry=r)
        self.tokens = Counter("cmesh_model_tokens_total", "Tokens processed",
                              labels + ("direction",), registry=r)
        self.load_seconds = Gauge("cmesh_model_load_seconds", "Time to load and warm the model",
                                  labels, registry=r)
        self.cold_start_seconds = Gauge("cmesh_replica_cold_start_seconds",
                                        "Process start to ready", registry=r)
        self.ready = Gauge("cmesh_replica_ready", "1 when serving, 0 when draining or loading",
                           registry=r)

    def model(self, model: str, variant: str) -> "ModelMetrics":
        return ModelMetrics(self, model, variant)


class ModelMetrics:
    """The metrics of one model variant, pre-labelled for the hot path."""

    def __init__(self, m: ServerMetrics, model: str, variant: str) -> None:
        self._m = m
        self._labels = (model, variant)
        self.queue_depth = m.queue_depth.labels(*self._labels)
        self.in_flight = m.in_flight.labels(*self._labels)
        self.batch_size = m.batch_size.labels(*self._labels)
        self.compute_seconds = m.compute_seconds.labels(*self._labels)
        self.queue_seconds = m.queue_seconds.labels(*self._labels)
        self.load_seconds = m.load_seconds.labels(*self._labels)
        self._tokens_in = m.tokens.labels(*self._labels, "input")
        self._tokens_out = m.tokens.labels(*self._labels, "output")
        # Per-request counters: labels() locks and builds keys, so children are kept.
        self._by_status: dict[str, object] = {}
        self._by_caller: dict[tuple[str, str], object] = {}

    def observe_batch(self, rows: int, seconds: float) -> None:
        self.batch_size.observe(rows)
        self.compute_seconds.observe(seconds)

    def caller(self, pipeline: str, latency_class: str) -> None:
        child = self._by_caller.get((pipeline, latency_class))
        if child is None:
            child = self._by_caller[(pipeline, latency_class)] = \
                self._m.by_pipeline.labels(*self._labels, pipeline, latency_class)
        child.inc()

    def count(self, status: str) -> None:
        child = self._by_status.get(status)
        if child is None:
            child = self._by_status[status] = self._m.requests.labels(*self._labels, status)
        child.inc()

    def tokens(self, input_tokens: int, output_tokens: int) -> None:
        if input_tokens:
            self._tokens_in.inc(input_tokens)
        if output_tokens:
            self._tokens_out.inc(output_tokens)
