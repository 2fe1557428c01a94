"""Replica generations: what makes a replica of a model obsolete after an apply,
which outgoing replicas to drain as their successors become ready, and how a mode
switch re-pools the replicas that run. Pure functions over handles and configs.

A replica is immutable, like a pod: it serves the config it was started with. Its
*generation* is a fingerprint of what it loads (sources, engine, batching,
resources, options; the store and the server section). A change to any of these
makes a rolling replacement: the new generation starts beside the old one and the
old drains one replica per new ready one (no capacity dips, no restart of the
router). Deployment, price, weights, rollout, tenants and trust are the router's
and the autoscaler's business: changing them re-pools or re-weights live.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from autoscaler.providers.base import LIVE, ReplicaHandle
from cmesh.config import DeploymentConfig, MeshConfig


def generation(config: MeshConfig, model: str) -> str:
    spec = config.models[model]
    template = {
        "variants": {name: {"source": v.source, "options": v.options}
                     for name, v in sorted(spec.variant_sources().items())},
        "engine": spec.engine,
        "batching": spec.batching.model_dump(mode="json"),
        "resources": spec.resources.model_dump(mode="json"),
        "options": spec.options,
        "store": config.store,
        "server": config.server.model_dump(mode="json"),
    }
    text = json.dumps(template, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def to_retire(outgoing: Sequence[ReplicaHandle], incoming_ready: int, desired: int) -> list[ReplicaHandle]:
    """The outgoing replicas of one pool to drain now. Ones not yet ready never
    served: they go at once. Of the ready ones, as many stay as the pool still
    needs beyond its ready successors (``desired`` counts only the new
    generation); the oldest go first."""
    waiting = [r for r in outgoing if r.state in ("cold", "warming")]
    ready = sorted((r for r in outgoing if r.state == "ready"), key=lambda r: r.started_at)
    keep = max(0, min(len(ready), desired - incoming_ready))
    return waiting + ready[:len(ready) - keep]


def repool(handles: Sequence[ReplicaHandle], deployment: DeploymentConfig) -> dict[str, str]:
    """Pool by replica id after a mode switch, moving running replicas instead of
    replacing them: ``dedicated`` and ``serverless`` take every one; ``auto`` fills
    the dedicated pool first (the longest-ready replicas) and keeps the rest
    serverless, where the policy scales them on load."""
    live = sorted((h for h in handles if h.state in LIVE),
                  key=lambda h: (h.state != "ready", h.started_at))
    if deployment.mode != "auto":
        return {h.id: deployment.mode for h in live}
    return {h.id: "dedicated" if i < deployment.dedicated_replicas else "serverless"
            for i, h in enumerate(live)}
