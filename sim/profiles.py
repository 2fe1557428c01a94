"""Model profiles: how a simulated replica of each model behaves.

A profile gives, per model, the batching curve (latency of one batch by batch
size, interpolated linearly between the measured sizes and extrapolated from the
last two), the batching kind (``dynamic``: one batch at a time, formed from
what waits; ``continuous``: iteration-level, a request joins the running batch
and takes the curve's latency at the batch size it joined), the largest batch,
and the cold start (log-normal: median and shape ``sigma``). ``outputs`` gives
the distribution of output values that pipeline ``when`` conditions read
(``intent.label``); a model without them outputs ``{}``. ``outputs_by_text``
(what ``cmesh profile`` measured per request text) gives a request with a
listed text exactly those outputs, so a condition on the label and on the text
(``orders``: an order-status label *and* a number in the text) holds for the
requests it held for in the real run, not for an independent draw of each.

``host.cores`` models CPU sharing between co-located replicas (this machine: 2
cores shared by every replica, the router and the autoscaler): a batch that
starts while the busy replicas together want more cores than the host has
(after ``host.overhead_cores`` for the router and the load generator) runs
slower by that ratio. No ``host.cores``: every replica has its own hardware
(the production case).

Declared profiles (YAML) describe hardware that is not here
(``sim/profiles/paper.yaml``: the paper's production figures); measured ones
come from ``cmesh profile`` on the machine it runs on.
"""
from __future__ import annotations

import bisect
import math
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from cmesh.validation import ConfigError, Strict, load_yaml, read_text, validate_mapping

PROFILES_DIR = Path(__file__).parent / "profiles"


class ProfileError(ConfigError):
    """An invalid profile file; ``errors`` name the field."""


class ModelProfile(Strict):
    """One model's simulated replica."""

    latency_ms: dict[int, float] = Field(description="batch size -> latency of one batch (ms)")
    batching: Literal["dynamic", "continuous"] = "dynamic"
    max_batch_size: int = Field(32, ge=1, description="most requests in one batch (continuous: running at once)")
    max_queue_delay_ms: float = Field(0.0, ge=0, description="dynamic: wait this long for batch-mates")
    cold_start_s: float = Field(1.0, ge=0, description="median cold start (start -> ready)")
    cold_start_sigma: float = Field(0.1, ge=0, le=3, description="log-normal shape of the cold start")
    cpu_cores: float = Field(1.0, gt=0, description="cores a computing replica uses (with host.cores)")
    outputs: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="output name -> value -> probability, for `when` conditions")
    outputs_by_text: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="request text -> output name -> value, as measured (cmesh "
                                          "profile); a request with a listed text gets these, others draw")
    measured: dict = Field(default_factory=dict, description="how it was measured (cmesh profile)")

    @field_validator("latency_ms")
    @classmethod
    def _curve(cls, v: dict[int, float]) -> dict[int, float]:
        if not v:
            raise ValueError("must give at least one batch size")
        if any(b < 1 for b in v) or any(ms <= 0 for ms in v.values()):
            raise ValueError("batch sizes must be >= 1 and latencies > 0")
        return dict(sorted(v.items()))

    @field_validator("outputs")
    @classmethod
    def _probabilities(cls, v: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for name, dist in v.items():
            if not dist or any(p < 0 for p in dist.values()) or sum(dist.values()) <= 0:
                raise ValueError(f"{name}: probabilities must be >= 0 and not all 0")
        return v

    def curve(self) -> "BatchCurve":
        return BatchCurve(self.latency_ms)


class HostProfile(Strict):
    cores: float | None = Field(None, gt=0, description="CPU cores shared by all replicas; None: no sharing")
    overhead_cores: float = Field(0.0, ge=0, description="cores the router, autoscaler and client use")
    network_ms: float = Field(0.5, ge=0, description="router <-> replica time per node call")

    @model_validator(mode="after")
    def _left(self) -> "HostProfile":
        if self.cores is not None and self.overhead_cores >= self.cores:
            raise ValueError("overhead_cores: must be less than cores")
        return self


class Profiles(Strict):
    name: str = "profiles"
    description: str = ""
    host: HostProfile = Field(default_factory=HostProfile)
    default: ModelProfile | None = Field(None, description="for models the file does not list")
    models: dict[str, ModelProfile] = Field(default_factory=dict)

    def for_model(self, model: str) -> ModelProfile:
        if model in self.models:
            return self.models[model]
        if self.default is not None:
            return self.default
        raise ProfileError(self.name, [f"models.{model}: no profile (add one, or a `default:` profile)"])


class BatchCurve:
    """Latency of one batch by its size, in seconds (piecewise linear)."""

    __slots__ = ("sizes", "secs", "_cache")

    def __init__(self, latency_ms: dict[int, float]) -> None:
        self.sizes = sorted(latency_ms)
        self.secs = [latency_ms[b] / 1000.0 for b in self.sizes]
        self._cache: dict[int, float] = {}

    def __call__(self, batch: int) -> float:
        got = self._cache.get(batch)
        if got is None:
            got = self._cache[batch] = self._interpolate(batch)
        return got

    def _interpolate(self, batch: int) -> float:
        sizes, secs = self.sizes, self.secs
        if len(sizes) == 1:
            return secs[0]
        i = bisect.bisect_left(sizes, batch)
        if i < len(sizes) and sizes[i] == batch:
            return secs[i]
        if i == 0:
            return secs[0]
        lo, hi = (i - 1, i) if i < len(sizes) else (len(sizes) - 2, len(sizes) - 1)
        slope = (secs[hi] - secs[lo]) / (sizes[hi] - sizes[lo])
        return max(secs[0], secs[lo] + slope * (batch - sizes[lo]))


def lognormal_mu(median_s: float) -> float:
    return math.log(median_s) if median_s > 0 else -math.inf


def parse_profiles(data: object, source: str = "profiles") -> Profiles:
    if isinstance(data, str):
        data = load_yaml(data, source, ProfileError)
    return validate_mapping(Profiles, data, source, ProfileError)


def load_profiles(path: str | Path) -> Profiles:
    """A profile file; a bare name (``paper``) is one shipped under ``sim/profiles/``."""
    p = Path(path)
    if not p.exists() and (PROFILES_DIR / f"{path}.yaml").exists():
        p = PROFILES_DIR / f"{path}.yaml"
    return parse_profiles(read_text(p, ProfileError), source=str(p))


def dump_profiles(profiles: Profiles) -> str:
    import yaml

    return yaml.safe_dump(profiles.model_dump(exclude_defaults=False), sort_keys=False)
