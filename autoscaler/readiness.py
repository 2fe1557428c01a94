"""Whether a ready replica still is: the pure half of the autoscaler's readiness probe.

A replica's one-shot "ready" line says its models loaded at start. What the
endpoint table promises routers is more: that each model (and variant) it
hosts answers now. So the autoscaler probes every ready replica with OIP
``ModelReady`` per model and variant (``autoscaler.prober`` does the I/O), and
this module judges the outcomes, Kubernetes-probe style: ``failure_threshold``
failures in a row replace the replica; one success resets the count, so one
slow probe does not kill a replica. Time comes in as ``now``; nothing here
reads a clock or does I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from cmesh.config import ReadinessProbeConfig


@dataclass(frozen=True)
class ProbeOutcome:
    """One probe of one replica: every model and variant answered ready, or not."""

    ok: bool
    reason: str = ""              # what failed: "m:default not ready", "DEADLINE_EXCEEDED", ...


@dataclass(frozen=True)
class ProbeRecord:
    """What the judge remembers about one replica between probes."""

    failures: int = 0             # consecutive failed probes
    failing_since: float | None = None
    last_reason: str = ""


@dataclass(frozen=True)
class Verdict:
    replace: bool
    reason: str = ""


KEEP = Verdict(replace=False)


def judge(record: ProbeRecord, outcome: ProbeOutcome, now: float,
          cfg: ReadinessProbeConfig) -> tuple[ProbeRecord, Verdict]:
    """The replica's new record and whether to replace it now."""
    if outcome.ok:
        return ProbeRecord(), KEEP
    record = replace(record, failures=record.failures + 1, last_reason=outcome.reason,
                     failing_since=record.failing_since if record.failing_since is not None else now)
    if record.failures < cfg.failure_threshold:
        return record, KEEP
    return record, Verdict(replace=True, reason=(
        f"failed {record.failures} readiness probes in a row over {now - record.failing_since:.1f}s: "
        f"{outcome.reason}"))
