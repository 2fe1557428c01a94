"""What the simulated clients send: replay scenarios (rate-scaled) and trace files.

A scenario is turned into one arrival stream per traffic class with the very
functions the replayer uses (``loadtest.scenario``: the class's own seeded
generator, thinning or time rescaling), so a simulated run sees the same
requests at the same times as ``loadtest.replay`` would send - but as arrays,
not millions of objects.

A trace file is CSV with a header: ``timestamp,target,latency_class`` (seconds
from the start; a pipeline or model name, ``pipeline:`` / ``model:`` prefixes
where a name is both; ``interactive`` or ``batch``) and an optional ``text``
column (what ``when`` conditions read).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmesh.config import MeshConfig
from loadtest.scenario import Scenario, class_schedule, load_scenario


@dataclass
class Stream:
    """One class's arrivals: times (sim seconds, ascending) and text indices."""

    name: str
    kind: str                 # "pipeline" or "model"
    target: str
    latency_class: str
    times: np.ndarray
    text_idx: np.ndarray
    texts: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.times)


@dataclass
class Workload:
    name: str
    duration_s: float         # sim seconds
    streams: list[Stream]

    @property
    def requests(self) -> int:
        return sum(len(s) for s in self.streams)


def from_scenario(scenario: Scenario | str | Path, *, compress: float = 1.0, rate_scale: float = 1.0,
                  seed: int | None = None) -> Workload:
    """The scenario's schedule as ``loadtest.scenario.arrivals`` draws it (same seed,
    same per-class generators), compressed by ``compress`` (on top of nothing: pass
    the scenario's own ``compress`` times any extra) and rate-scaled."""
    if not isinstance(scenario, Scenario):
        scenario = load_scenario(scenario)
    if compress <= 0 or rate_scale <= 0:
        raise ValueError("compress and rate_scale must be > 0")
    streams = []
    for cls in scenario.classes:
        times, picks, texts = class_schedule(scenario, cls, rate_scale, seed)
        streams.append(Stream(cls.name, cls.target_kind, cls.target, cls.latency_class,
                              np.asarray(times, dtype=float) / compress, picks, tuple(texts)))
    return Workload(scenario.name, scenario.duration_s / compress, streams)


def from_trace(path: str | Path, config: MeshConfig) -> Workload:
    """A trace file (see the module docstring); one stream per (target, class)."""
    rows: dict[tuple[str, str, str], list[tuple[float, str]]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"timestamp", "target", "latency_class"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))} "
                             "(header: timestamp,target,latency_class[,text])")
        for n, row in enumerate(reader, start=2):
            kind, target = _target(row["target"].strip(), config, f"{path}:{n}")
            lc = row["latency_class"].strip() or "interactive"
            if lc not in ("interactive", "batch"):
                raise ValueError(f"{path}:{n}: latency_class {lc!r} is not interactive or batch")
            rows.setdefault((kind, target, lc), []).append((float(row["timestamp"]), row.get("text") or ""))
    streams = []
    t0 = min((t for r in rows.values() for t, _ in r), default=0.0)
    end = 0.0
    for (kind, target, lc), items in sorted(rows.items()):
        items.sort()
        texts = tuple(sorted({t for _, t in items})) or ("",)
        index = {t: i for i, t in enumerate(texts)}
        times = np.asarray([t - t0 for t, _ in items])
        end = max(end, float(times[-1]))
        streams.append(Stream(f"{target}-{lc}", kind, target, lc, times,
                              np.asarray([index[t] for _, t in items]), texts))
    return Workload(Path(path).stem, end + 1.0, streams)


def _target(text: str, config: MeshConfig, where: str) -> tuple[str, str]:
    if text.startswith("pipeline:"):
        name, kind = text.split(":", 1)[1], "pipeline"
    elif text.startswith("model:"):
        name, kind = text.split(":", 1)[1], "model"
    elif text in config.pipelines:
        name, kind = text, "pipeline"
    else:
        name, kind = text, "model"
    known = config.pipelines if kind == "pipeline" else config.models
    if name not in known:
        raise ValueError(f"{where}: unknown {kind} {name!r}")
    return kind, name
