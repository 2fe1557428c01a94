"""Load reports are checked whole before any of them reaches the metrics window.

Reports come from routers (authenticated mesh callers, but a bug or a config
skew is still possible), and what they carry is summed, averaged and turned into
replica counts and ``Status`` integers. So every number must be a count a real
router could see: non-negative and at most ``MAX_COUNT`` per model and report; a
model must be one of the config's; a report names each model once. Entries with a
``variant`` (a router's answers per model:variant, for the canary analysis) name
each model:variant once, a variant of the model's when ``models`` is the config's
mapping; their figures hang together: failed <= answered, at most ``N_BUCKETS``
latency counts, and no more OK latencies than answers that did not fail. The first
problem is raised as ``InvalidInput`` naming the field
(``models[2].in_flight: must be <= 1000000, got 9223372036854775807``).
"""
from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping

from cmesh.config import NAME_RE, ModelConfig
from cmesh.errors import InvalidInput
from cmesh.latency import N_BUCKETS
from protos import mesh_pb2

MAX_COUNT = 1_000_000             # requests in flight, queued, held, arrived or answered per entry and report
MAX_SOURCE_CHARS = 256
MAX_LOAD_SECONDS = 86_400.0
MAX_VARIANT_ENTRIES = 4096        # per report, as many as a router keeps (router.variant_stats.MAX_KEYS)


def _quote(name: str) -> str:
    """A caller's name in a message, clipped (it travels in trailing metadata)."""
    return repr(name) if len(name) <= 64 else f"{name[:64]!r}... ({len(name)} long)"


def _count(field: str, value: int) -> None:
    if value < 0:
        raise InvalidInput(field, f"must be >= 0, got {value}")
    if value > MAX_COUNT:
        raise InvalidInput(field, f"must be <= {MAX_COUNT}, got {value}")


def _variant(where: str, load: mesh_pb2.ModelLoad, models: Mapping[str, ModelConfig] | Collection[str]) -> None:
    spec = models.get(load.model) if isinstance(models, Mapping) else None
    if isinstance(spec, ModelConfig):
        known = spec.variant_sources()
        if load.variant not in known:
            raise InvalidInput(f"{where}.variant", f"model {load.model!r} has no variant {_quote(load.variant)}; "
                                                   f"variants: {sorted(known)}")
    elif not re.match(NAME_RE, load.variant):
        raise InvalidInput(f"{where}.variant", f"{_quote(load.variant)} must match {NAME_RE}")


def _answers(where: str, load: mesh_pb2.ModelLoad) -> None:
    for name in ("answered", "failed"):
        _count(f"{where}.{name}", getattr(load, name))
    if load.failed > load.answered:
        raise InvalidInput(f"{where}.failed", f"must be <= answered ({load.answered}), got {load.failed}")
    counts = load.latency_counts
    if len(counts) > N_BUCKETS:
        raise InvalidInput(f"{where}.latency_counts", f"must have at most {N_BUCKETS} buckets, got {len(counts)}")
    for j, c in enumerate(counts):
        _count(f"{where}.latency_counts[{j}]", c)
    timed, ok = sum(counts), load.answered - load.failed
    if timed > ok:                                      # only OK answers are timed
        raise InvalidInput(f"{where}.latency_counts", f"{timed} latencies counted for only {ok} answers "
                                                      f"that did not fail")


def validate_report(report: mesh_pb2.LoadReport, models: Mapping[str, ModelConfig] | Collection[str]) -> None:
    """Raise ``InvalidInput`` for the first field of ``report`` out of bounds.
    ``models`` is the config's ``{name: ModelConfig}`` (variants are checked too) or
    just the names."""
    if len(report.source) > MAX_SOURCE_CHARS:
        raise InvalidInput("source", f"must be at most {MAX_SOURCE_CHARS} characters, got {len(report.source)}")
    if report.timestamp_ms < 0:
        raise InvalidInput("timestamp_ms", f"must be >= 0, got {report.timestamp_ms}")
    if len(report.models) > len(models) + MAX_VARIANT_ENTRIES:
        raise InvalidInput("models", f"{len(report.models)} entries for a config of {len(models)} models "
                                     f"(and at most {MAX_VARIANT_ENTRIES} per-variant entries)")
    seen: set[tuple[str, str]] = set()
    variant_entries = 0
    for i, load in enumerate(report.models):
        where = f"models[{i}]"
        if load.model not in models:
            raise InvalidInput(f"{where}.model", f"unknown model {_quote(load.model)}; the config has "
                                                 f"{sorted(models)}")
        if load.variant:
            variant_entries += 1
            if variant_entries > MAX_VARIANT_ENTRIES:
                raise InvalidInput(f"{where}.variant", f"more than {MAX_VARIANT_ENTRIES} per-variant entries")
            _variant(where, load, models)
        key = (load.model, load.variant)
        if key in seen:
            name = f"{load.model}:{load.variant}" if load.variant else load.model
            raise InvalidInput(f"{where}.variant" if load.variant else f"{where}.model",
                               f"{name!r} is reported twice")
        seen.add(key)
        for name in ("queue_depth", "in_flight", "arrivals"):
            _count(f"{where}.{name}", getattr(load, name))
        if not (math.isfinite(load.load_seconds) and 0 <= load.load_seconds <= MAX_LOAD_SECONDS):
            raise InvalidInput(f"{where}.load_seconds", f"must be finite, in [0, {MAX_LOAD_SECONDS:g}], "
                                                        f"got {load.load_seconds}")
        _answers(where, load)
    for model, held in report.held.items():
        if model not in models:
            raise InvalidInput(f"held[{_quote(model)}]", f"unknown model; the config has {sorted(models)}")
        _count(f"held[{model!r}]", held)
