"""Open Inference Protocol tensors <-> numpy, with validation that names the input.

Both wire forms are accepted: typed ``contents`` and ``raw_input_contents``
(BYTES elements are 4-byte little-endian length-prefixed). Responses use the raw
form, which is what tritonclient reads.
"""
from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cmesh.errors import InvalidInput
from protos import inference_pb2 as pb

# OIP datatype -> (numpy dtype, InferTensorContents field for the typed form)
DTYPES: dict[str, tuple[Any, str | None]] = {
    "BOOL": (np.bool_, "bool_contents"),
    "UINT8": (np.uint8, "uint_contents"),
    "UINT16": (np.uint16, "uint_contents"),
    "UINT32": (np.uint32, "uint_contents"),
    "UINT64": (np.uint64, "uint64_contents"),
    "INT8": (np.int8, "int_contents"),
    "INT16": (np.int16, "int_contents"),
    "INT32": (np.int32, "int_contents"),
    "INT64": (np.int64, "int64_contents"),
    "FP16": (np.float16, None),  # raw form only, per the protocol
    "FP32": (np.float32, "fp32_contents"),
    "FP64": (np.float64, "fp64_contents"),
    "BYTES": (np.object_, "bytes_contents"),
}
_NP_TO_OIP = {np.dtype(t): name for name, (t, _) in DTYPES.items() if name != "BYTES"}


def oip_dtype(array: np.ndarray) -> str:
    if array.dtype == np.object_ or array.dtype.kind in ("S", "U"):
        return "BYTES"
    try:
        return _NP_TO_OIP[array.dtype]
    except KeyError:
        raise TypeError(f"no OIP datatype for numpy dtype {array.dtype}") from None


def _element_count(name: str, shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        if dim < 0:
            raise InvalidInput(name, f"shape {list(shape)} has a negative dimension")
        count *= dim
    return count


def deserialize_bytes(name: str, raw: bytes, count: int) -> np.ndarray:
    out = np.empty(count, dtype=np.object_)
    offset, end = 0, len(raw)
    for i in range(count):
        if offset + 4 > end:
            raise InvalidInput(name, f"BYTES data holds fewer than the {count} elements its shape declares")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > end:
            raise InvalidInput(name, f"BYTES element {i} is truncated")
        out[i] = raw[offset:offset + length]
        offset += length
    if offset != end:
        raise InvalidInput(name, f"BYTES data holds more than the {count} elements its shape declares")
    return out


def serialize_bytes(array: np.ndarray) -> bytes:
    parts = []
    for item in array.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def decode_tensor(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> np.ndarray:
    name = tensor.name
    if tensor.datatype not in DTYPES:
        raise InvalidInput(name, f"unsupported datatype {tensor.datatype!r}")
    dtype, field = DTYPES[tensor.datatype]
    shape = tuple(int(d) for d in tensor.shape)
    count = _element_count(name, shape)
    if raw is not None:
        if tensor.datatype == "BYTES":
            flat = deserialize_bytes(name, raw, count)
        else:
            itemsize = np.dtype(dtype).itemsize
            if len(raw) != count * itemsize:
                raise InvalidInput(name, f"shape {list(shape)} of {tensor.datatype} needs "
                                         f"{count * itemsize} bytes, got {len(raw)}")
            flat = np.frombuffer(raw, dtype=dtype)
        return flat.reshape(shape)
    if field is None:
        raise InvalidInput(name, f"{tensor.datatype} data must be sent in raw_input_contents")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidInput(name, f"shape {list(shape)} needs {count} elements, contents hold {len(values)}")
    if tensor.datatype == "BYTES":
        flat = np.empty(count, dtype=np.object_)
        flat[:] = list(values)
        return flat.reshape(shape)
    return np.asarray(values, dtype=dtype).reshape(shape)


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    raws = list(request.raw_input_contents)
    if raws and len(raws) != len(request.inputs):
        raise InvalidInput("raw_input_contents",
                           f"{len(raws)} raw buffers for {len(request.inputs)} inputs")
    out: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        if not tensor.name:
            raise InvalidInput(f"inputs[{i}]", "input has no name")
        if tensor.name in out:
            raise InvalidInput(tensor.name, "input given twice")
        if raws and tensor.HasField("contents"):
            raise InvalidInput(tensor.name, "both contents and raw_input_contents given")
        out[tensor.name] = decode_tensor(tensor, raws[i] if raws else None)
    return out


def param_value(p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def decode_parameters(params: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    return {k: param_value(v) for k, v in params.items()}


def set_param(params: Any, key: str, value: Any) -> None:
    """Write a python value into a protobuf map<string, InferParameter>."""
    p = params[key]
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)


def encode_outputs(response: pb.ModelInferResponse, outputs: Mapping[str, np.ndarray]) -> None:
    for name, array in outputs.items():
        array = np.asarray(array)
        datatype = oip_dtype(array)
        out = response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        del out  # fields set through add(); raw bytes follow in order
        if datatype == "BYTES":
            response.raw_output_contents.append(serialize_bytes(array))
        else:
            response.raw_output_contents.append(np.ascontiguousarray(array).tobytes())


def decode_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Client side: the response's outputs as numpy arrays (raw or typed form)."""
    raws = list(response.raw_output_contents)
    out: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(response.outputs):
        out[tensor.name] = decode_tensor(tensor, raws[i] if raws else None)  # type: ignore[arg-type]
    return out


def encode_inputs(request: pb.ModelInferRequest, inputs: Mapping[str, np.ndarray]) -> None:
    """Client side: add numpy inputs to a request in raw form."""
    for name, array in inputs.items():
        array = np.asarray(array)
        if array.dtype.kind in ("U", "S"):
            array = np.array([s.encode() if isinstance(s, str) else s for s in array.reshape(-1)],
                             dtype=np.object_).reshape(array.shape)
        datatype = oip_dtype(array)
        request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        if datatype == "BYTES":
            request.raw_input_contents.append(serialize_bytes(array))
        else:
            request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
