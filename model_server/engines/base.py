"""The one small interface every engine implements.

An engine is synchronous and single-threaded: the batcher calls ``run_batch`` on
one worker thread per model, never concurrently, so engines need no locks.
``prepare`` validates and pre-processes one request; it runs on the event loop
and must be cheap (no model calls). Errors that concern one request are raised
from ``prepare`` as ``InvalidInput`` naming the input, or returned from
``run_batch`` as an ``ItemResult`` with ``error`` set, so one bad request never
fails its batch neighbours.
"""
from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from cmesh.errors import InvalidInput, MeshError
from cmesh.manifest import Manifest, TensorSpec
from cmesh.tensors import DTYPES


@dataclass(frozen=True)
class EngineContext:
    model: str                 # served model name, e.g. "embedder"
    variant: str               # variant name, "default" for single-source models
    model_dir: Path            # local directory of the store version
    manifest: Manifest
    device: str = "cpu"        # "cpu" or "cuda[:N]"
    options: dict[str, Any] = field(default_factory=dict)  # manifest options + config overrides
    max_batch_size: int = 8

    def option(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)


@dataclass
class InferItem:
    """One validated request as the batcher and engine see it."""

    inputs: dict[str, np.ndarray]
    parameters: dict[str, Any]
    rows: int = 1              # batch rows this request adds (its first dimension)
    length: int = 0            # sequence length estimate, for bucketing; 0 = unbucketed
    input_tokens: int = 0
    prepared: Any = None       # engine-specific pre-processing result
    requested_outputs: tuple[str, ...] = ()


@dataclass
class ItemResult:
    """One request's answer: outputs, or an error that concerns it alone."""

    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    error: MeshError | None = None
    output_tokens: int = 0


class Engine(abc.ABC):
    """Load, warm up, run a batch, report memory."""

    kind: ClassVar[str]            # the manifest's ``engine`` value
    generative: ClassVar[bool] = False
    # Batches the batcher may run at once. 1 (the default): ``run_batch`` is only
    # ever called from one thread. Engines whose calls are independent and
    # thread-safe (a tool like sql-sqlite, with a connection per slot) set more
    # in ``load``, so one slow batch never holds up the batches behind it.
    concurrent_batches: int = 1

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.ctx.manifest.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.ctx.manifest.outputs

    @abc.abstractmethod
    def load(self) -> None:
        """Load weights/resources from ``ctx.model_dir``. Blocking; runs off the loop."""

    def warmup(self) -> None:
        """Run a representative batch so the first request pays no lazy-init cost."""

    @abc.abstractmethod
    def prepare(self, inputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> InferItem:
        """Validate one request (raise InvalidInput naming the input) and build its item."""

    @abc.abstractmethod
    def run_batch(self, items: list[InferItem]) -> list[ItemResult]:
        """Run the items as one batch; return exactly one result per item, in order."""

    def memory_bytes(self) -> int:
        return self.ctx.manifest.memory_mb * 1024 * 1024

    def unload(self) -> None:
        """Release resources. The engine is not used after this."""

    # -- helpers shared by engines -------------------------------------------------

    def check_inputs(self, inputs: dict[str, np.ndarray]) -> int:
        """Generic checks against the manifest: required inputs present, no unknown
        inputs, datatypes and ranks/fixed dims match, batch dims agree and fit.
        Returns the request's batch rows."""
        known = {spec.name for spec in self.inputs}
        for name in inputs:
            if name not in known:
                raise InvalidInput(name, f"unknown input; model {self.ctx.model!r} takes {sorted(known)}")
        rows = None
        for spec in self.inputs:
            array = inputs.get(spec.name)
            if array is None:
                if spec.optional:
                    continue
                raise InvalidInput(spec.name, "required input is missing")
            check_tensor(spec, array)
            if rows is None:
                rows = int(array.shape[0])
            elif int(array.shape[0]) != rows:
                raise InvalidInput(spec.name, f"batch dimension {array.shape[0]} differs from "
                                              f"the other inputs' {rows}")
        rows = rows or 0
        if rows < 1:
            raise InvalidInput(self.inputs[0].name, "batch dimension must be >= 1")
        if rows > self.ctx.max_batch_size:
            raise InvalidInput(self.inputs[0].name, f"batch of {rows} exceeds max_batch_size "
                                                    f"{self.ctx.max_batch_size}")
        return rows


def check_tensor(spec: TensorSpec, array: np.ndarray) -> None:
    expected_dtype = np.dtype(DTYPES[spec.datatype][0])
    if array.dtype != expected_dtype:
        from cmesh.tensors import oip_dtype
        raise InvalidInput(spec.name, f"datatype {oip_dtype(array)} given, {spec.datatype} expected")
    if array.ndim != len(spec.shape):
        raise InvalidInput(spec.name, f"shape {list(array.shape)} does not match {spec.shape}")
    for got, want in zip(array.shape, spec.shape):
        if want != -1 and got != want:
            raise InvalidInput(spec.name, f"shape {list(array.shape)} does not match {spec.shape}")


def decode_texts(name: str, array: np.ndarray, *, max_chars: int) -> list[str]:
    """BYTES tensor -> list of str, rejecting empty, non-UTF-8 and over-long texts."""
    texts = []
    for i, raw in enumerate(array.reshape(-1)):
        try:
            text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else str(raw)
        except UnicodeDecodeError:
            raise InvalidInput(name, f"element {i} is not valid UTF-8") from None
        if not text.strip():
            raise InvalidInput(name, f"element {i} is empty")
        if len(text) > max_chars:
            raise InvalidInput(name, f"element {i} has {len(text)} characters, limit {max_chars}")
        texts.append(text)
    return texts


_REGISTRY: dict[str, type[Engine]] = {}
# Optional engines that cannot work in this process (e.g. no TensorRT or no GPU)
# record why here instead of registering, so choosing them says why, not "unknown".
_UNAVAILABLE: dict[str, str] = {}
# Optional engines whose availability is checked on first use, not at import:
# the check may touch the GPU driver, which a process must not do before it forks
# (the replica fork server imports this package).
_DEFERRED: dict[str, tuple[type[Engine], Callable[[], str | None]]] = {}


def register(cls: type[Engine]) -> type[Engine]:
    _REGISTRY[cls.kind] = cls
    return cls


def register_if_available(cls: type[Engine], probe: Callable[[], str | None]) -> None:
    """Register ``cls`` on its first look-up if ``probe()`` (the reason it cannot
    run here, or None) allows; otherwise remember the reason."""
    _DEFERRED[cls.kind] = (cls, probe)


def engine_class(kind: str) -> type[Engine]:
    from model_server import engines  # noqa: F401  (registers the built-in engines)

    if kind in _DEFERRED:
        cls, probe = _DEFERRED.pop(kind)
        reason = probe()
        if reason is None:
            register(cls)
        else:
            _UNAVAILABLE[kind] = reason
    try:
        return _REGISTRY[kind]
    except KeyError:
        if kind in _UNAVAILABLE:
            raise ValueError(f"engine {kind!r} is not available here: {_UNAVAILABLE[kind]}") from None
        raise ValueError(f"unknown engine {kind!r}; known: {sorted(_REGISTRY)}") from None


def known_engine(kind: str) -> bool:
    """Whether ``kind`` names an engine, usable here or not (TensorRT without a GPU
    is known): a manifest check that touches no device."""
    from model_server import engines  # noqa: F401  (registers the built-in engines)

    return kind in _REGISTRY or kind in _DEFERRED or kind in _UNAVAILABLE
