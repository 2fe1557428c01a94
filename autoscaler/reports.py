"""Load reports are checked whole before any of them reaches the metrics window.

Reports come from routers (authenticated mesh callers, but a bug or a config
skew is still possible), and what they carry is summed, averaged and turned into
replica counts and ``Status`` integers. So every number must be a count a real
router could see: non-negative and at most ``MAX_COUNT`` per model and report; a
model must be one of the config's; a report names each model once. The first
problem is raised as ``InvalidInput`` naming the field
(``models[2].in_flight: must be <= 1000000, got 9223372036854775807``).
"""
from __future__ import annotations

import math
from collections.abc import Collection

from cmesh.errors import InvalidInput
from protos import mesh_pb2

MAX_COUNT = 1_000_000             # requests in flight, queued, held or arrived per model and report
MAX_SOURCE_CHARS = 256
MAX_LOAD_SECONDS = 86_400.0


def _quote(name: str) -> str:
    """A caller's name in a message, clipped (it travels in trailing metadata)."""
    return repr(name) if len(name) <= 64 else f"{name[:64]!r}... ({len(name)} long)"


def _count(field: str, value: int) -> None:
    if value < 0:
        raise InvalidInput(field, f"must be >= 0, got {value}")
    if value > MAX_COUNT:
        raise InvalidInput(field, f"must be <= {MAX_COUNT}, got {value}")


def validate_report(report: mesh_pb2.LoadReport, models: Collection[str]) -> None:
    """Raise ``InvalidInput`` for the first field of ``report`` out of bounds."""
    if len(report.source) > MAX_SOURCE_CHARS:
        raise InvalidInput("source", f"must be at most {MAX_SOURCE_CHARS} characters, got {len(report.source)}")
    if report.timestamp_ms < 0:
        raise InvalidInput("timestamp_ms", f"must be >= 0, got {report.timestamp_ms}")
    if len(report.models) > len(models):
        raise InvalidInput("models", f"{len(report.models)} entries for a config of {len(models)} models")
    seen: set[str] = set()
    for i, load in enumerate(report.models):
        where = f"models[{i}]"
        if load.model not in models:
            raise InvalidInput(f"{where}.model", f"unknown model {_quote(load.model)}; the config has "
                                                 f"{sorted(models)}")
        if load.model in seen:
            raise InvalidInput(f"{where}.model", f"{load.model!r} is reported twice")
        seen.add(load.model)
        for name in ("queue_depth", "in_flight", "arrivals"):
            _count(f"{where}.{name}", getattr(load, name))
        if not (math.isfinite(load.load_seconds) and 0 <= load.load_seconds <= MAX_LOAD_SECONDS):
            raise InvalidInput(f"{where}.load_seconds", f"must be finite, in [0, {MAX_LOAD_SECONDS:g}], "
                                                        f"got {load.load_seconds}")
    for model, held in report.held.items():
        if model not in models:
            raise InvalidInput(f"held[{_quote(model)}]", f"unknown model; the config has {sorted(models)}")
        _count(f"held[{model!r}]", held)
