"""Replica choice as a pure function of a snapshot of one model's replicas.

The scheduler builds ``ReplicaView``s from its endpoint table, in-flight counters
and the outlier detector, and asks ``choose`` for the replica that takes the
next queued request. ``None`` means "no capacity now": the request stays queued
(where priority can act) until an in-flight call finishes. ``has_any_replica``
tells that case apart from "there is no replica at all", where the router holds
the request and asks the autoscaler to warm one (DESIGN.md §4).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Pool = Literal["dedicated", "serverless"]
Mode = Literal["dedicated", "serverless", "auto"]
_POOLS = ("dedicated", "serverless")
_MODES = ("dedicated", "serverless", "auto")


@dataclass(frozen=True)
class ReplicaView:
    """What dispatch needs to know of one replica, at one instant."""

    id: str
    pool: Pool
    in_flight: int
    cap: int                 # the router's in-flight cap for this replica
    ready: bool = True
    ejected: bool = False    # by outlier detection, for now

    def __post_init__(self) -> None:
        if self.pool not in _POOLS:
            raise ValueError(f"pool: must be 'dedicated' or 'serverless', not {self.pool!r}")
        if self.cap < 1:
            raise ValueError(f"cap: must be >= 1, not {self.cap}")
        if self.in_flight < 0:
            raise ValueError(f"in_flight: must be >= 0, not {self.in_flight}")

    @property
    def load(self) -> float:
        return self.in_flight / self.cap


@dataclass(frozen=True)
class Choice:
    replica_id: str
    spilled: bool = False    # sent to serverless because dedicated was past its threshold


def _rank(r: ReplicaView) -> tuple[float, int, str]:
    # Least loaded first; ties go to fewer in flight, then id, so that equal
    # snapshots always give equal answers (tests, and no flapping between routers).
    return (r.load, r.in_flight, r.id)


def _least_loaded(replicas: Iterable[ReplicaView], pool: Pool) -> ReplicaView | None:
    pooled = [r for r in replicas if r.pool == pool]
    return min(pooled, key=_rank) if pooled else None


def choose(replicas: Iterable[ReplicaView], mode: Mode, capacity_threshold: float = 0.8,
           exclude: frozenset[str] | set[str] = frozenset()) -> Choice | None:
    """The replica for the next request, or None if none has room.

    Candidates are ready, not ejected, not in ``exclude`` (replicas a retry must
    avoid) and under their cap. ``auto`` keeps traffic on the dedicated pool
    while its least-loaded replica is under ``capacity_threshold`` of its cap,
    spills to the least-loaded serverless replica beyond that, and, with no
    serverless room, still fills dedicated replicas up to their hard cap.
    """
    if mode not in _MODES:
        raise ValueError(f"mode: must be one of {_MODES}, not {mode!r}")
    if not 0 < capacity_threshold <= 1:
        raise ValueError(f"capacity_threshold: must be in (0, 1], not {capacity_threshold}")
    candidates = [r for r in replicas
                  if r.ready and not r.ejected and r.id not in exclude and r.in_flight < r.cap]
    if mode != "auto":
        best = _least_loaded(candidates, mode)
        return Choice(best.id) if best else None
    dedicated = _least_loaded(candidates, "dedicated")
    if dedicated is not None and dedicated.in_flight < capacity_threshold * dedicated.cap:
        return Choice(dedicated.id)
    serverless = _least_loaded(candidates, "serverless")
    if serverless is not None:
        return Choice(serverless.id, spilled=True)
    return Choice(dedicated.id) if dedicated is not None else None


def has_any_replica(replicas: Iterable[ReplicaView], mode: Mode = "auto") -> bool:
    """Whether any ready replica exists in a pool ``mode`` may use, whatever its
    load or ejection. True: wait for capacity. False: hold and ask to warm.

    Ejected replicas count: an ejection ends on its own, and warming a new
    replica would not help a pool that outlier detection keeps partly ejected."""
    pools = _POOLS if mode == "auto" else (mode,)
    return any(r.ready and r.pool in pools for r in replicas)
