"""``torch``: a generic engine for a TorchScript module in the version directory.

The manifest is the contract: its inputs, in order, are the module's positional
arguments; its outputs name what the module returns (a tensor for one output,
a tuple/list in manifest order, or a dict keyed by output name). Numeric
tensors only: text needs an engine that knows its tokenizer.

Batching concatenates items along dim 0, which is only meaningful when every
item agrees on all the other dims. Items are therefore grouped by their
non-batch shapes and each group is one forward call; a model whose manifest has
no leading -1 on every tensor is not batchable at all and runs item by item.
If a forward call fails, the group's items are retried one by one so that one
request the model rejects never fails its neighbours.

The pure helpers (path check, grouping, positional arguments, output mapping)
are module functions. ``TensorEngine`` holds the tensor-in/tensor-out request
handling that ``tensorrt`` shares; ``text_classifier`` reuses the loading.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cmesh.errors import Internal, InvalidInput
from cmesh.manifest import TensorSpec
from cmesh.tensors import DTYPES
from model_server.engines.base import Engine, InferItem, ItemResult, register
from model_server.engines.torch_util import inference_threads, resolve_device

log = logging.getLogger(__name__)

DEFAULT_FILE = "model.pt"


class OutputContractError(ValueError):
    """The module returned something the manifest's outputs do not describe."""


# -- pure helpers -------------------------------------------------------------------

def version_file(model_dir: Path, name: str) -> Path:
    """``options.file`` resolved inside the version directory; a manifest must not
    point a replica at files outside its own store version."""
    base = Path(model_dir).resolve()
    path = (base / name).resolve()
    if base != path and base not in path.parents:
        raise ValueError(f"options.file {name!r} must name a file inside the version directory")
    if not path.is_file():
        raise FileNotFoundError(f"options.file {name!r}: no such file in {base}")
    return path


def is_batchable(specs: Sequence[TensorSpec]) -> bool:
    """Items can be concatenated along dim 0 only when every tensor has a
    variable leading (batch) dimension."""
    return all(spec.shape[0] == -1 for spec in specs)


def positional_args(specs: Sequence[TensorSpec], inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """The request's tensors as positional arguments. An optional input may be left
    out only when every later one is too: positions cannot skip an argument."""
    args: list[np.ndarray] = []
    missing: str | None = None
    for spec in specs:
        array = inputs.get(spec.name)
        if array is None:
            missing = missing or spec.name
            continue
        if missing is not None:
            raise InvalidInput(missing, f"optional input may be omitted only together with every "
                                        f"later input; {spec.name!r} is given")
        # A private, writable, contiguous copy where needed: wire tensors are
        # read-only views, and a module may write to its inputs in place.
        args.append(np.require(array, requirements=("C", "W")))
    return tuple(args)


def signature(args: Sequence[np.ndarray]) -> tuple:
    """What items must share to be concatenated: arity, dtypes, non-batch dims."""
    return tuple((a.dtype.str, a.shape[1:]) for a in args)


def group_items(args_per_item: Sequence[Sequence[np.ndarray]], batchable: bool = True) -> list[list[int]]:
    """Item indices grouped by signature, groups and members in arrival order."""
    if not batchable:
        return [[i] for i in range(len(args_per_item))]
    groups: dict[tuple, list[int]] = {}
    for i, args in enumerate(args_per_item):
        groups.setdefault(signature(args), []).append(i)
    return list(groups.values())


def split_rows(outputs: dict[str, np.ndarray], rows: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Cut batch outputs back into per-item outputs by their row counts."""
    bounds = np.cumsum([0, *rows])
    return [{name: array[bounds[i]:bounds[i + 1]] for name, array in outputs.items()}
            for i in range(len(rows))]


def output_values(raw: Any, specs: Sequence[TensorSpec]) -> list[Any]:
    """The module's return value as one value per manifest output, in order."""
    names = [spec.name for spec in specs]
    if isinstance(raw, dict):
        absent = [n for n in names if n not in raw]
        if absent:
            raise OutputContractError(f"model returned a dict without outputs {absent}; "
                                      f"it has {sorted(map(str, raw))}")
        return [raw[n] for n in names]
    if isinstance(raw, (tuple, list)):
        if len(raw) != len(specs):
            raise OutputContractError(f"model returned {len(raw)} values, manifest declares "
                                      f"{len(specs)} outputs {names}")
        return list(raw)
    if len(specs) != 1:
        raise OutputContractError(f"model returned one value, manifest declares {len(specs)} outputs {names}")
    return [raw]


def check_output(spec: TensorSpec, array: np.ndarray, rows: int | None) -> None:
    if array.ndim != len(spec.shape) or any(
            want != -1 and got != want for got, want in zip(array.shape, spec.shape)):
        raise OutputContractError(f"output {spec.name!r} has shape {list(array.shape)}, "
                                  f"manifest declares {spec.shape}")
    if rows is not None and array.shape[0] != rows:
        raise OutputContractError(f"output {spec.name!r} has {array.shape[0]} rows for {rows} input rows")


def numpy_dtype(spec: TensorSpec) -> np.dtype:
    return np.dtype(DTYPES[spec.datatype][0])


def warmup_arrays(specs: Sequence[TensorSpec], rows: int) -> dict[str, np.ndarray] | None:
    """Zero inputs of ``rows`` rows, or None when a non-batch dim is variable
    (no shape to guess that is sure to be valid for the model)."""
    arrays = {}
    for spec in specs:
        dims = list(spec.shape)
        if dims[0] == -1:
            dims[0] = rows
        if any(d == -1 for d in dims):
            return None
        arrays[spec.name] = np.zeros(dims, dtype=numpy_dtype(spec))
    return arrays


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


# -- TorchScript loading (shared with text_classifier) ----------------------------------

@contextlib.contextmanager
def quiet_jit() -> Iterator[None]:
    # torch marks torch.jit deprecated, but TorchScript is the self-contained,
    # Python-free format these engines serve; one warning per load is noise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=DeprecationWarning)
        yield


def load_torchscript(path: Path, device: str):
    import torch

    with quiet_jit():
        module = torch.jit.load(str(path), map_location=device)
    return module.eval()


# -- the engines ---------------------------------------------------------------------

class TensorEngine(Engine):
    """Numeric tensors in, numeric tensors out, per the manifest: request checks,
    shape grouping, per-item error isolation and row splitting. Subclasses load
    an executor, set ``batchable`` and ``_out_dtypes``, and implement ``forward``.
    (``tensorrt`` shares all of this with ``torch``.)"""

    batchable: bool = True

    def check_numeric(self) -> None:
        for spec in (*self.inputs, *self.outputs):
            if spec.datatype == "BYTES":
                raise ValueError(f"engine {self.kind!r}: tensor {spec.name!r} is BYTES; this engine "
                                 "takes and returns numeric tensors only")

    def forward(self, args_per_item: list[tuple[np.ndarray, ...]]) -> dict[str, np.ndarray]:
        """One model call over the items (concatenated when batchable); the outputs
        by manifest name. Raises OutputContractError when the model's outputs do not
        match the manifest, RuntimeError when the model fails."""
        raise NotImplementedError

    def warmup(self) -> None:
        sizes = sorted({1, self.ctx.max_batch_size}) if self.batchable else [0]
        for rows in sizes:
            arrays = warmup_arrays(self.inputs, rows)
            if arrays is None:
                log.info("%s: no warm-up, an input has a variable non-batch dimension", self.ctx.model)
                return
            (result,) = self.run_batch([self.prepare(arrays, {})])
            if result.error is not None:
                raise RuntimeError(f"warm-up of {self.ctx.model!r} failed: {result.error.message}")

    def prepare(self, inputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> InferItem:
        rows = self.check_inputs(inputs)
        return InferItem(inputs=inputs, parameters=parameters, rows=rows,
                         prepared=positional_args(self.inputs, inputs))

    def run_batch(self, items: list[InferItem]) -> list[ItemResult]:
        results: list[ItemResult | None] = [None] * len(items)
        for group in group_items([item.prepared for item in items], self.batchable):
            for i, result in zip(group, self._run_group([items[i] for i in group])):
                results[i] = result
        return results  # type: ignore[return-value]

    def _run_group(self, items: list[InferItem]) -> list[ItemResult]:
        import torch

        try:
            outputs = self.forward([item.prepared for item in items])
        except OutputContractError as exc:
            err = Internal(f"model {self.ctx.model!r} broke its manifest: {exc}", component=self.ctx.model)
            return [ItemResult(error=err) for _ in items]
        except RuntimeError as exc:  # torch.jit.Error and shape errors are RuntimeErrors
            if len(items) > 1:
                # Find the item(s) at fault rather than failing the whole group.
                return [self._run_group([item])[0] for item in items]
            if isinstance(exc, torch.OutOfMemoryError):
                return [ItemResult(error=Internal(f"out of memory: {first_line(exc)}",
                                                  component=self.ctx.model))]
            return [ItemResult(error=InvalidInput(self.inputs[0].name,
                                                  f"model rejected the input: {first_line(exc)}",
                                                  component=self.ctx.model))]
        if not self.batchable:
            return [ItemResult(outputs=outputs)]
        return [ItemResult(outputs=o) for o in split_rows(outputs, [item.rows for item in items])]

    def concat(self, args_per_item: list[tuple[np.ndarray, ...]]) -> list[np.ndarray]:
        if len(args_per_item) == 1:
            return list(args_per_item[0])
        return [np.concatenate(column, axis=0) for column in zip(*args_per_item)]

    def output_dtypes(self) -> list:
        """torch dtype of each manifest output (conversion happens in torch, so
        bfloat16 results convert cleanly)."""
        import torch

        return [torch.from_numpy(np.zeros(0, numpy_dtype(s))).dtype for s in self.outputs]


@register
class TorchScriptEngine(TensorEngine):
    kind = "torch"

    def load(self) -> None:
        import torch

        self.check_numeric()
        inference_threads(self.ctx.option("torch_threads"))
        self.device = resolve_device(self.ctx.device)
        path = version_file(self.ctx.model_dir, str(self.ctx.option("file", DEFAULT_FILE)))
        self.module = load_torchscript(path, self.device)
        self.batchable = is_batchable([*self.inputs, *self.outputs])
        self._out_dtypes = self.output_dtypes()
        self._torch = torch

    def forward(self, args_per_item: list[tuple[np.ndarray, ...]]) -> dict[str, np.ndarray]:
        torch = self._torch
        arrays = self.concat(args_per_item)
        rows = int(arrays[0].shape[0]) if self.batchable and arrays else None
        with torch.inference_mode():
            tensors = [torch.from_numpy(a).to(self.device) for a in arrays]
            values = output_values(self.module(*tensors), self.outputs)
            out: dict[str, np.ndarray] = {}
            for spec, dtype, value in zip(self.outputs, self._out_dtypes, values):
                if not isinstance(value, torch.Tensor):
                    raise OutputContractError(f"output {spec.name!r} is a {type(value).__name__}, "
                                              "not a tensor")
                array = value.detach().to(device="cpu", dtype=dtype).numpy()
                check_output(spec, array, rows)
                out[spec.name] = array
        return out

    def unload(self) -> None:
        self.module = None
