"""Prometheus metrics of pipelines, on the router's registry."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from router.metrics import LATENCY_BUCKETS

SHARE_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class PipelineMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.latency = Histogram("cmesh_pipeline_seconds", "End-to-end pipeline latency", ("pipeline", "status"),
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.node_latency = Histogram("cmesh_pipeline_node_seconds", "Latency of each node call",
                                      ("pipeline", "node", "status"), buckets=LATENCY_BUCKETS, registry=registry)
        self.critical_share = Histogram("cmesh_pipeline_critical_path_share",
                                        "A node's share of its pipeline's critical path (0 when off it)",
                                        ("pipeline", "node"), buckets=SHARE_BUCKETS, registry=registry)

    def observe(self, pipeline: str, status: str, total_ms: float, nodes, shares: dict[str, float]) -> None:
        self.latency.labels(pipeline, status).observe(total_ms / 1000.0)
        for n in nodes:
            if n.status != "skipped":
                self.node_latency.labels(pipeline, n.node, n.status).observe(max(0.0, n.end_ms - n.start_ms) / 1000.0)
            self.critical_share.labels(pipeline, n.node).observe(shares.get(n.node, 0.0))
