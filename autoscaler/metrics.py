"""Prometheus metrics of the autoscaler."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class AutoscalerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.desired = Gauge("cmesh_autoscaler_desired_replicas", "Replicas the policy wants", ("model", "pool"),
                             registry=r)
        self.replicas = Gauge("cmesh_autoscaler_replicas", "Replicas by state (cold, warming, ready, draining)",
                              ("model", "pool", "state"), registry=r)
        self.cold_start = Gauge("cmesh_autoscaler_cold_start_seconds", "Last measured cold start (process "
                                "start to ready)", ("model",), registry=r)
        self.device_used = Gauge("cmesh_autoscaler_device_used_mb", "Memory packed onto a device", ("device",),
                                 registry=r)
        self.scale_events = Counter("cmesh_autoscaler_scale_events_total", "Scale-ups and scale-downs",
                                    ("model", "pool", "direction"), registry=r)
        self.warms = Counter("cmesh_autoscaler_warm_requests_total", "Warm-ups asked for", ("model", "reason"),
                             registry=r)
        self.rollout_state = Gauge("cmesh_rollout_state", "Canary rollout: 0 progressing, 1 promoted, "
                                   "-1 rolled back", ("model",), registry=r)
        self.rollout_step = Gauge("cmesh_rollout_step", "Canary rollout: the current step (index)", ("model",),
                                  registry=r)
        self.rollout_weight = Gauge("cmesh_rollout_weight_percent", "Canary rollout: traffic share by variant",
                                    ("model", "variant"), registry=r)
        self.leader = Gauge("cmesh_autoscaler_leader", "1 while this autoscaler leads", registry=r)
        self._seen: set[tuple[str, str, str]] = set()

    def observe_replicas(self, replicas) -> None:
        counts: dict[tuple[str, str, str], int] = {}
        for h in replicas:
            key = (h.model, h.pool, h.state)
            counts[key] = counts.get(key, 0) + 1
            if h.cold_start_s:
                self.cold_start.labels(h.model).set(h.cold_start_s)
        for key in self._seen - set(counts):
            self.replicas.labels(*key).set(0)       # a state nobody is in any more
        for key, n in counts.items():
            self.replicas.labels(*key).set(n)
        self._seen |= set(counts)
