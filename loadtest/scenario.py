"""Trace-replay scenarios: parse, validate, and turn into an open-loop arrival schedule.

Pure: no network, no clock. ``parse_scenario`` validates a YAML document (errors
name the field, e.g. ``classes.0.rate_per_s: must be > 0``); ``arrivals`` turns a
scenario into the list of requests to send and when, deterministically from the
scenario's seed. ``loadtest.replay`` is the I/O around it.

A scenario file::

    name: spike10x
    seed: 7
    duration_s: 300            # scenario seconds
    compress: 1                # default time compression (--compress overrides)
    process: {kind: poisson}   # or {kind: gamma, cv: 2.0}: a renewal process
    shapes:                    # rate multipliers over scenario time (default 1)
      burst:
        - {from_s: 120, to_s: 180, multiplier: 10}
        # optional linear ramp: {from_s: 0, to_s: 60, multiplier: 1, end_multiplier: 3}
    classes:
      - name: support
        pipeline: support-agent        # or  model: embedder  (+ input: text)
        latency_class: interactive
        rate_per_s: 1.0                # base rate, per scenario second
        shape: burst
        texts: ["Where is my order 1042?", ...]

A class's rate at scenario time t is ``rate_per_s * multiplier(t)``. Poisson
classes are drawn by thinning a homogeneous process at the peak rate; renewal
classes (gamma gaps of shape 1/CV², so the inter-arrival CV is ``cv``) are drawn
in operational time and mapped through the inverse cumulative rate (time
rescaling), because thinning a renewal process would pull its CV towards 1.
Compressing by X divides every arrival time by X: the same requests, X times faster.
"""
from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from cmesh.validation import ConfigError, Strict, load_yaml, read_text, validate_mapping

LatencyClass = Literal["interactive", "batch"]
ParamValue = bool | int | float | str

DEFAULT_TEXTS = (
    "How do I reset my password?",
    "Where is my order 1042?",
    "Can I change the shipping address of my order?",
    "My invoice shows the wrong amount.",
)


class ScenarioError(ConfigError):
    """An invalid scenario; ``errors`` holds one 'field: rule' line per problem."""


class Segment(Strict):
    """A stretch of scenario time with its own rate multiplier."""

    from_s: float = Field(ge=0)
    to_s: float = Field(gt=0)
    multiplier: float = Field(ge=0)
    end_multiplier: float | None = Field(default=None, ge=0)   # linear ramp to this at to_s

    @model_validator(mode="after")
    def _ordered(self) -> "Segment":
        if self.to_s <= self.from_s:
            raise ValueError(f"to_s: must be > from_s ({self.from_s:g})")
        return self


class Process(Strict):
    """How gaps between arrivals are distributed."""

    kind: Literal["poisson", "gamma"] = "poisson"
    cv: float = Field(default=1.0, gt=0)     # inter-arrival coefficient of variation

    @model_validator(mode="after")
    def _poisson_cv(self) -> "Process":
        if self.kind == "poisson" and self.cv != 1.0:
            raise ValueError("cv: a poisson process has cv 1; use kind: gamma for another cv")
        return self


class TrafficClass(Strict):
    """One stream of requests: a target, a latency class and a base rate."""

    name: str = ""                           # default: target-latency_class
    pipeline: str | None = None              # Pipelines.Run on this pipeline...
    model: str | None = None                 # ...or ModelInfer on this model
    input: str = "text"                      # the model's BYTES input tensor
    latency_class: LatencyClass = "interactive"
    rate_per_s: float = Field(gt=0)          # per scenario second, before the shape
    shape: str | None = None                 # a key of `shapes`; none: flat
    process: Process | None = None           # none: the scenario's process
    texts: list[str] = Field(default_factory=list)
    params: dict[str, ParamValue] = Field(default_factory=dict)   # ModelInfer parameters
    pipeline_id: str = ""                    # cmesh-pipeline-id; default: pipeline name / scenario

    @model_validator(mode="after")
    def _one_target(self) -> "TrafficClass":
        if (self.pipeline is None) == (self.model is None):
            raise ValueError("pipeline: give exactly one of pipeline or model")
        if self.pipeline is not None and self.params:
            raise ValueError("params: only model targets take parameters")
        if not self.name:
            self.name = f"{self.target}-{self.latency_class}"
        return self

    @property
    def target_kind(self) -> str:
        return "pipeline" if self.pipeline is not None else "model"

    @property
    def target(self) -> str:
        return self.pipeline if self.pipeline is not None else self.model  # type: ignore[return-value]


class Scenario(Strict):
    name: str = Field(min_length=1)
    description: str = ""
    seed: int = Field(ge=0)
    duration_s: float = Field(gt=0)          # scenario seconds
    compress: float = Field(default=1.0, gt=0)
    process: Process = Field(default_factory=Process)
    shapes: dict[str, list[Segment]] = Field(default_factory=dict)
    classes: list[TrafficClass] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> "Scenario":
        for name, segments in self.shapes.items():
            for i, seg in enumerate(segments):
                if seg.to_s > self.duration_s:
                    raise ValueError(f"shapes.{name}.{i}.to_s: must be <= duration_s ({self.duration_s:g})")
                if i and seg.from_s < segments[i - 1].to_s:
                    raise ValueError(f"shapes.{name}.{i}.from_s: overlaps or precedes segment {i - 1} "
                                     f"(which ends at {segments[i - 1].to_s:g}); list segments in time order")
        seen: set[str] = set()
        for i, cls in enumerate(self.classes):
            if cls.name in seen:
                raise ValueError(f"classes.{i}.name: duplicate class name {cls.name!r}; give each a distinct name")
            seen.add(cls.name)
            if cls.shape is not None and cls.shape not in self.shapes:
                known = ", ".join(sorted(self.shapes)) or "none defined"
                raise ValueError(f"classes.{i}.shape: unknown shape {cls.shape!r} (shapes: {known})")
        return self


def parse_scenario(data: Any, source: str = "scenario") -> Scenario:
    """Validate a scenario (a mapping, or YAML text)."""
    if isinstance(data, str):
        data = load_yaml(data, source, ScenarioError)
    return validate_mapping(Scenario, data, source, ScenarioError)


def load_scenario(path: str | Path) -> Scenario:
    return parse_scenario(read_text(path, ScenarioError), source=str(path))


# --- rate shapes ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Pieces:
    """A class's multiplier as contiguous linear pieces covering [0, duration]."""

    t0: np.ndarray
    t1: np.ndarray
    m0: np.ndarray
    m1: np.ndarray

    def at(self, t: np.ndarray) -> np.ndarray:
        i = np.clip(np.searchsorted(self.t0, t, side="right") - 1, 0, len(self.t0) - 1)
        frac = (t - self.t0[i]) / (self.t1[i] - self.t0[i])
        return self.m0[i] + (self.m1[i] - self.m0[i]) * frac

    def areas(self) -> np.ndarray:
        return (self.m0 + self.m1) / 2.0 * (self.t1 - self.t0)

    @property
    def peak(self) -> float:
        return float(max(self.m0.max(), self.m1.max()))


def pieces(segments: list[Segment], duration_s: float) -> Pieces:
    """Segments plus multiplier-1 fillers between and around them."""
    rows: list[tuple[float, float, float, float]] = []
    t = 0.0
    for seg in segments:
        if seg.from_s > t:
            rows.append((t, seg.from_s, 1.0, 1.0))
        end = seg.multiplier if seg.end_multiplier is None else seg.end_multiplier
        rows.append((seg.from_s, seg.to_s, seg.multiplier, end))
        t = seg.to_s
    if t < duration_s:
        rows.append((t, duration_s, 1.0, 1.0))
    a = np.asarray(rows, dtype=float)
    return Pieces(t0=a[:, 0], t1=a[:, 1], m0=a[:, 2], m1=a[:, 3])


def class_pieces(scenario: Scenario, cls: TrafficClass) -> Pieces:
    return pieces(scenario.shapes[cls.shape] if cls.shape else [], scenario.duration_s)


def rate_at(scenario: Scenario, cls: TrafficClass, t_s: float) -> float:
    """The class's arrival rate (per scenario second) at scenario time t_s."""
    return cls.rate_per_s * float(class_pieces(scenario, cls).at(np.asarray([t_s]))[0])


def expected_count(scenario: Scenario, cls: TrafficClass | None = None) -> float:
    """Mean number of arrivals of one class (or of all) over the scenario."""
    classes = [cls] if cls is not None else scenario.classes
    return sum(c.rate_per_s * float(class_pieces(scenario, c).areas().sum()) for c in classes)


# --- arrival processes ---------------------------------------------------------------------

def poisson_thinning(rng: np.random.Generator, rate: float, shape: Pieces, duration_s: float) -> np.ndarray:
    """Non-homogeneous Poisson arrivals by thinning (Lewis & Shedler)."""
    peak = rate * shape.peak
    if peak <= 0:
        return np.empty(0)
    n = rng.poisson(peak * duration_s)
    t = np.sort(rng.uniform(0.0, duration_s, n))
    keep = rng.uniform(0.0, peak, n) < rate * shape.at(t)
    return t[keep]


def renewal_rescaled(rng: np.random.Generator, rate: float, shape: Pieces, cv: float) -> np.ndarray:
    """A gamma renewal process (inter-arrival CV = cv) with a time-varying rate:
    unit-mean gamma gaps in operational time, mapped back through the inverse of the
    cumulative rate Λ(t) (piecewise quadratic for linear pieces)."""
    areas = rate * shape.areas()
    total = float(areas.sum())
    if total <= 0:
        return np.empty(0)
    k = 1.0 / (cv * cv)
    taus: list[np.ndarray] = []
    last = 0.0
    while last < total:
        chunk = np.cumsum(rng.gamma(k, 1.0 / k, int(total - last) + 64)) + last
        taus.append(chunk)
        last = float(chunk[-1])
    tau = np.concatenate(taus)
    tau = tau[tau < total]
    starts = np.concatenate([[0.0], np.cumsum(areas)[:-1]])
    i = np.searchsorted(starts, tau, side="right") - 1
    d = tau - starts[i]
    a = rate * shape.m0[i]
    b = rate * (shape.m1[i] - shape.m0[i]) / (shape.t1[i] - shape.t0[i])
    # Solve a*u + b*u²/2 = d for u in the piece, in the form stable for b -> 0 and a -> 0.
    u = 2.0 * d / (a + np.sqrt(np.maximum(a * a + 2.0 * b * d, 0.0)))
    return np.minimum(shape.t0[i] + u, shape.t1[i])


@dataclass(frozen=True)
class Arrival:
    t_s: float                  # when to send, seconds after the replay starts (compressed)
    target_kind: str            # "pipeline" or "model"
    target: str
    latency_class: str
    payload_text: str
    class_name: str = ""
    scenario_t_s: float = 0.0   # the same moment in scenario time
    input_name: str = "text"    # model targets: the BYTES input tensor
    pipeline_id: str = ""       # cmesh-pipeline-id metadata
    params: Mapping[str, ParamValue] = field(default_factory=dict)


def class_seed(seed: int, name: str) -> np.random.Generator:
    """One generator per class, from the scenario seed and the class name, so adding
    or reordering classes leaves the others' schedules unchanged."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def class_schedule(scenario: Scenario, cls, rate_scale: float = 1.0,
                   seed: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One class's arrival times (scenario seconds), the index of each request's text,
    and the texts: the draw ``arrivals`` and the simulator (``sim.workload``) share."""
    rng = class_seed(scenario.seed if seed is None else seed, cls.name)
    shape = class_pieces(scenario, cls)
    process = cls.process or scenario.process
    if process.kind == "poisson":
        times = poisson_thinning(rng, cls.rate_per_s * rate_scale, shape, scenario.duration_s)
    else:
        times = renewal_rescaled(rng, cls.rate_per_s * rate_scale, shape, process.cv)
    texts = cls.texts or list(DEFAULT_TEXTS)
    return times, rng.integers(0, len(texts), len(times)), texts


def arrivals(scenario: Scenario, compress: float = 1.0, rate_scale: float = 1.0) -> list[Arrival]:
    """The open-loop schedule: every request, in time order. ``rate_scale`` multiplies
    every class's rate (the same shape at a fraction of the load): with
    ``compress`` X and ``rate_scale`` 1/X a scenario runs X times faster at its
    original requests per second."""
    if compress <= 0:
        raise ScenarioError("compress", ["compress: must be > 0"])
    if rate_scale <= 0:
        raise ScenarioError("rate_scale", ["rate_scale: must be > 0"])
    rows: list[tuple[float, int, Arrival]] = []
    for order, cls in enumerate(scenario.classes):
        times, picks, texts = class_schedule(scenario, cls, rate_scale)
        pipeline_id = cls.pipeline_id or (cls.pipeline if cls.pipeline is not None else f"replay-{scenario.name}")
        for t, pick in zip(times.tolist(), picks.tolist()):
            rows.append((t, order, Arrival(
                t_s=t / compress, target_kind=cls.target_kind, target=cls.target,
                latency_class=cls.latency_class, payload_text=texts[pick], class_name=cls.name,
                scenario_t_s=t, input_name=cls.input, pipeline_id=pipeline_id, params=dict(cls.params))))
    rows.sort(key=lambda r: (r[0], r[1]))
    return [r[2] for r in rows]
