"""Placement: which device a new replica goes on, by memory, first-fit decreasing.

Devices are declared in ``mesh.yaml`` (name, kind, memory, optional replica
slots). A replica needs its model's memory estimate (``resources.memory_mb``,
else the manifest's). New replicas are placed largest first, each on the first
device (in declared order) with enough free memory and a free slot: the
largest items are the hard ones, and placing them while memory is still
unfragmented is what makes first-fit decreasing pack well (about 11/9 of the
optimal number of devices at worst). Declared order doubles as preference:
list the device you want filled first, first.

A replica that fits nowhere right now is *refused* with a message saying what
it needed and what the best candidate had; a model that could not fit even on
an empty device is a configuration error, reported at load by ``check_fits``.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cmesh.config import DeviceConfig, MeshConfig, ModelConfig
from cmesh.validation import ConfigError

DEFAULT_MEMORY_MB = 64          # the manifest's default estimate


@dataclass(frozen=True)
class ReplicaRequest:
    model: str
    memory_mb: int
    kind: str | None = None     # "cpu" / "cuda"; None: any device


@dataclass(frozen=True)
class Placed:
    model: str
    device: str
    memory_mb: int


@dataclass(frozen=True)
class PlacementResult:
    placed: list[tuple[ReplicaRequest, str]]      # (request, device name)
    refused: list[tuple[ReplicaRequest, str]]     # (request, reason)

    def as_placed(self) -> list[Placed]:
        return [Placed(r.model, device, r.memory_mb) for r, device in self.placed]


@dataclass(frozen=True)
class DeviceUsage:
    name: str
    kind: str
    memory_mb: int
    used_mb: int
    replicas: int


def replica_request(name: str, model: ModelConfig, manifest_memory_mb: int | None = None) -> ReplicaRequest:
    """The request for one replica of ``name``: the config's memory override,
    else the manifest's estimate; the device kind from ``resources.device``."""
    memory = model.resources.memory_mb or manifest_memory_mb or DEFAULT_MEMORY_MB
    return ReplicaRequest(name, int(memory), _kind(model.resources.device))


def place(requests: Iterable[ReplicaRequest], devices: list[DeviceConfig],
          existing: Iterable[Placed] = ()) -> PlacementResult:
    """Place ``requests`` on ``devices`` around the ``existing`` replicas."""
    free = {d.name: d.memory_mb for d in devices}
    slots = {d.name: d.max_replicas for d in devices}          # None: memory decides
    for p in existing:
        if p.device in free:                                   # a device since removed holds nothing
            free[p.device] -= p.memory_mb
            if slots[p.device] is not None:
                slots[p.device] -= 1
    placed: list[tuple[ReplicaRequest, str]] = []
    refused: list[tuple[ReplicaRequest, str]] = []
    # Decreasing by memory; the model name keeps the order deterministic.
    for req in sorted(requests, key=lambda r: (-r.memory_mb, r.model)):
        candidates = [d for d in devices if req.kind is None or d.kind == req.kind]
        target = next((d for d in candidates if free[d.name] >= req.memory_mb
                       and (slots[d.name] is None or slots[d.name] > 0)), None)
        if target is None:
            refused.append((req, _refusal(req, candidates, free, slots)))
            continue
        free[target.name] -= req.memory_mb
        if slots[target.name] is not None:
            slots[target.name] -= 1
        placed.append((req, target.name))
    return PlacementResult(placed=placed, refused=refused)


def utilisation(devices: list[DeviceConfig], placed: Iterable[Placed]) -> list[DeviceUsage]:
    """Per declared device: memory used and replicas on it (for Status)."""
    used = {d.name: 0 for d in devices}
    count = {d.name: 0 for d in devices}
    for p in placed:
        if p.device in used:
            used[p.device] += p.memory_mb
            count[p.device] += 1
    return [DeviceUsage(d.name, d.kind, d.memory_mb, used[d.name], count[d.name]) for d in devices]


def check_fits(config: MeshConfig, estimates: Mapping[str, int] | None = None,
               source: str = "mesh.yaml") -> None:
    """Raise ConfigError for every model that cannot fit on any declared device
    even when that device is empty. ``estimates`` are manifest memory
    estimates for models without ``resources.memory_mb``."""
    errors = []
    estimates = estimates or {}
    for name, model in config.scaled_models.items():
        req = replica_request(name, model, estimates.get(name))
        candidates = [d for d in config.devices if d.kind == req.kind]
        if not candidates:
            errors.append(f"models.{name}.resources.device: needs a {req.kind} device; "
                          f"none is declared under devices")
            continue
        largest = max(candidates, key=lambda d: d.memory_mb)
        if req.memory_mb > largest.memory_mb:
            errors.append(f"models.{name}.resources.memory_mb: {req.memory_mb} MB fits on no device "
                          f"(largest {req.kind} device: {largest.name} {largest.memory_mb} MB)")
    if errors:
        raise ConfigError(source, errors)


# ------------------------------------------------------------------- helpers


def _kind(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"


def _refusal(req: ReplicaRequest, candidates: list[DeviceConfig], free: dict[str, int],
             slots: dict[str, int | None]) -> str:
    head = f"model {req.model!r} needs {req.memory_mb} MB"
    if not candidates:
        return f"{head} on a {req.kind} device; none is declared"
    open_ = [d for d in candidates if slots[d.name] is None or slots[d.name] > 0]
    if not open_:
        full = ", ".join(f"{d.name} {d.max_replicas} of {d.max_replicas}" for d in candidates)
        return f"{head}; every device is out of replica slots ({full})"
    best = max(open_, key=lambda d: free[d.name])
    return f"{head}; largest free: {best.name} {max(0, free[best.name])} MB of {best.memory_mb} MB"
