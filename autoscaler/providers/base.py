"""What the control loop needs from a place that runs replicas.

The loop only says how many replicas of a model's pool it wants; a provider
moves toward that (starting, draining, stopping) and reports every replica's
state, calling back whenever something changes so the endpoint table follows.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

# Replica states, in order: cold (asked for, nothing running yet) -> warming
# (process or pod starting, model loading) -> ready (in the endpoint table) ->
# draining (out of the table, finishing in-flight work) -> gone.
STATES = ("cold", "warming", "ready", "draining")
LIVE = STATES[:3]                      # counted as the pool's: all but draining


@dataclass
class ReplicaHandle:
    id: str
    model: str
    pool: str                          # "dedicated" or "serverless"
    device: str = ""
    state: str = "cold"
    address: str | None = None         # host:port once listening
    started_at: float = 0.0            # monotonic
    cold_start_s: float | None = None  # the replica's own measurement (process start -> ready)
    variants: tuple[str, ...] = ()
    memory_mb: int = 0
    generation: str = ""               # autoscaler.generations: what it was started to serve
    config_id: str = ""                # the applied config it was started with
    info: dict = field(default_factory=dict)


class Provider(Protocol):
    def replicas(self) -> list[ReplicaHandle]:
        """Every replica this provider runs, in any state."""

    async def scale(self, model: str, pool: str, desired: int, devices: list[str]) -> None:
        """Move the model's pool toward ``desired`` replicas. Returns promptly: start-up
        and drain proceed in the background and show up through ``replicas()`` and
        the change callback. ``devices`` are placement choices for new replicas,
        one per replica to add (the provider may ignore them, e.g. Kubernetes)."""

    def subscribe(self, callback: Callable[[], None]) -> None:
        """``callback()`` runs after any replica changes state."""

    async def close(self) -> None:
        """Stop every replica (drained where possible) and leave nothing running."""


class RollingProvider(Provider, Protocol):
    """A provider that follows applied configs with rolling replacements (the local
    one): replicas of an older generation keep serving until the controller retires
    them, and a mode switch moves running replicas between pools."""

    def apply(self, config, config_path: str, config_id: str) -> None:
        """New replicas start from ``config_path``; ``scale`` counts only replicas
        of each model's current generation from now on."""

    def outgoing(self, model: str) -> list[ReplicaHandle]:
        """Live replicas of the model from an older generation (or of a removed model)."""

    def retire(self, handle: ReplicaHandle) -> None:
        """Drain one replica: out of the endpoint table, then stopped."""

    def repool(self, pools: dict[str, str]) -> None:
        """Move running replicas (by id) to other pools, without a restart."""


class ReplacingProvider(Provider, Protocol):
    """A provider the autoscaler's readiness probe (``autoscaler.prober``) can act
    through: the local one. (Kubernetes pods are judged by the kubelet's probes instead.)"""

    async def replace(self, handle: ReplicaHandle, reason: str) -> None:
        """Take a ready replica that failed its probes out of the endpoint table and
        stop it; no longer counted, it is succeeded on the loop's next tick."""
