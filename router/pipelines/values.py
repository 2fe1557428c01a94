"""Plain values <-> OIP tensors, for pipeline nodes.

Expressions see plain values: one text (str), a list of texts, a vector (numpy
1-D), a number. A model's manifest says how its inputs are typed and shaped;
one pipeline request is one row of a batch.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from cmesh.errors import InvalidInput
from cmesh.manifest import TensorSpec
from cmesh.tensors import DTYPES


def to_tensor(spec: TensorSpec, value: Any, *, node: str = "", pipeline: str = "") -> np.ndarray:
    """``value`` as one request's tensor for ``spec`` (batch dimension of 1)."""
    field = f"{spec.name}"
    if value is None:
        raise InvalidInput(field, "the node's input evaluated to nothing", node=node, pipeline=pipeline)
    if spec.datatype == "BYTES":
        items = value if isinstance(value, (list, tuple)) else [value]
        encoded = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in items]
        array = np.array(encoded, dtype=object)
        return array.reshape([len(encoded)] + [1] * (len(spec.shape) - 1)) if len(spec.shape) > 1 else array
    dtype = np.dtype(DTYPES[spec.datatype][0])
    array = np.asarray(value, dtype=dtype)
    if array.ndim == len(spec.shape) - 1:        # one row: add the batch dimension
        array = array.reshape((1, *array.shape))
    return array


def from_outputs(outputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """One request's outputs as plain values (its single row, unwrapped)."""
    values: dict[str, Any] = {}
    for name, array in outputs.items():
        row = array[0] if array.ndim >= 1 and array.shape[0] == 1 else array
        values[name] = _plain(row)
    if outputs:
        values["output"] = values[next(iter(outputs))]
    return values


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return [_plain(v) for v in value.tolist()]
        return value if value.ndim else value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    return value
