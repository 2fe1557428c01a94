"""Open Inference Protocol tensors <-> numpy, with validation that names the input.

Both wire forms are accepted: typed ``contents`` and ``raw_input_contents``
(BYTES elements are 4-byte little-endian length-prefixed). Responses use the raw
form, which is what tritonclient reads.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cmesh.bytes_elements import Malformed, join_elements, split_elements
from cmesh.config import InputLimits
from cmesh.errors import InvalidInput, quote
from protos import inference_pb2 as pb

DEFAULT_LIMITS = InputLimits()

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
_ITEMSIZE = {name: np.dtype(t).itemsize for name, (t, _) in DTYPES.items() if name != "BYTES"}


def oip_dtype(array: np.ndarray) -> str:
    if array.dtype == np.object_ or array.dtype.kind in ("S", "U"):
        return "BYTES"
    try:
        return _NP_TO_OIP[array.dtype]
    except KeyError:
        raise TypeError(f"no OIP datatype for numpy dtype {array.dtype}") from None


def check_shape(name: str, shape: Sequence[int], limits: InputLimits = DEFAULT_LIMITS) -> int:
    """The element count of ``shape``, or InvalidInput if it breaks a limit. Costs
    O(rank): a hostile shape like [2**62, 4] is refused by arithmetic alone."""
    if len(shape) > limits.max_rank:
        raise InvalidInput(name, f"rank {len(shape)} exceeds the limit of {limits.max_rank} dimensions")
    count = 1
    for dim in shape:
        if dim < 0:
            raise InvalidInput(name, f"shape {list(shape)} has a negative dimension")
        if dim > limits.max_elements:
            # Even beside a 0 (no elements at all), numpy cannot shape an array so.
            raise InvalidInput(name, f"shape {list(shape)} has a dimension of {dim}, more than the limit "
                                     f"of {limits.max_elements} elements")
        count *= dim
    if shape and shape[0] > limits.max_batch:
        raise InvalidInput(name, f"batch dimension {shape[0]} exceeds the limit of {limits.max_batch}")
    if count > limits.max_elements:
        raise InvalidInput(name, f"shape {list(shape)} holds {count} elements, more than the limit "
                                 f"of {limits.max_elements}")
    return count


def deserialize_bytes(name: str, raw: bytes, count: int) -> np.ndarray:
    try:
        values = split_elements(raw, count)
    except Malformed as exc:
        raise InvalidInput(name, str(exc)) from None
    out = np.empty(count, dtype=np.object_)
    out[:] = values
    return out


def serialize_bytes(array: np.ndarray) -> bytes:
    return join_elements(item if isinstance(item, bytes) else str(item).encode("utf-8")
                         for item in array.reshape(-1))


def check_tensor(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None,
                 limits: InputLimits = DEFAULT_LIMITS) -> int:
    """Validate one tensor's declaration against the data present; returns its
    element count. Nothing is allocated: BYTES data is only sized here. (On the
    router's hot path: ``shape[:]`` because iterating a protobuf container is slow.)"""
    datatype = tensor.datatype
    if datatype not in DTYPES:
        raise InvalidInput(tensor.name, f"unsupported datatype {quote(datatype)}")
    shape = tensor.shape[:]
    count = check_shape(tensor.name, shape, limits)
    if datatype == "BYTES" and count > limits.max_text_elements:
        raise InvalidInput(tensor.name, f"{count} BYTES elements exceed the limit of {limits.max_text_elements}")
    if raw is not None:
        if datatype == "BYTES":
            if count * 4 > len(raw):
                raise InvalidInput(tensor.name, f"BYTES data of {len(raw)} bytes cannot hold the {count} "
                                                "elements its shape declares")
        elif len(raw) != count * _ITEMSIZE[datatype]:
            raise InvalidInput(tensor.name, f"shape {shape} of {datatype} needs {count * _ITEMSIZE[datatype]} "
                                            f"bytes, got {len(raw)}")
        return count
    field = DTYPES[datatype][1]
    if field is None:
        raise InvalidInput(tensor.name, f"{datatype} data must be sent in raw_input_contents")
    held = len(getattr(tensor.contents, field))
    if held != count:
        raise InvalidInput(tensor.name, f"shape {shape} needs {count} elements, contents hold {held}")
    return count


def decode_tensor(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None,
                  limits: InputLimits = DEFAULT_LIMITS) -> np.ndarray:
    return _decode(tensor, raw, check_tensor(tensor, raw, limits))


def _decode(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, count: int) -> np.ndarray:
    """A tensor ``check_tensor`` has validated (``count`` elements) as a numpy array."""
    dtype, field = DTYPES[tensor.datatype]
    shape = tensor.shape[:]
    if raw is not None:
        if tensor.datatype == "BYTES":
            flat = deserialize_bytes(tensor.name, raw, count)
        else:
            flat = np.frombuffer(raw, dtype=dtype)
        return flat.reshape(shape)
    values = getattr(tensor.contents, field)
    if tensor.datatype == "BYTES":
        flat = np.empty(count, dtype=np.object_)
        flat[:] = list(values)
        return flat.reshape(shape)
    return np.asarray(values, dtype=dtype).reshape(shape)


def check_request(request: pb.ModelInferRequest, limits: InputLimits = DEFAULT_LIMITS) -> list[int]:
    """Validate every input's declaration against the bytes present and the limits,
    in time proportional to the message; returns each input's element count. The
    router runs this before anything else touches the tensors; the model server
    runs it again through ``decode_inputs`` (it may be called directly)."""
    inputs = request.inputs
    n = len(inputs)
    if n > limits.max_inputs:
        raise InvalidInput("inputs", f"{n} inputs exceed the limit of {limits.max_inputs}")
    raws = request.raw_input_contents
    n_raw = len(raws)
    if n_raw and n_raw != n:
        raise InvalidInput("raw_input_contents", f"{n_raw} raw buffers for {n} inputs")
    seen: set[str] = set()
    counts = []
    for i in range(n):
        tensor = inputs[i]
        name = tensor.name
        if not name:
            raise InvalidInput(f"inputs[{i}]", "input has no name")
        if name in seen:
            raise InvalidInput(name, "input given twice")
        seen.add(name)
        if n_raw and tensor.HasField("contents"):
            raise InvalidInput(name, "both contents and raw_input_contents given")
        counts.append(check_tensor(tensor, raws[i] if n_raw else None, limits))
    return counts


def decode_inputs(request: pb.ModelInferRequest, limits: InputLimits = DEFAULT_LIMITS) -> dict[str, np.ndarray]:
    counts = check_request(request, limits)
    raws = request.raw_input_contents
    inputs = request.inputs
    return {inputs[i].name: _decode(inputs[i], raws[i] if raws else None, count)
            for i, count in enumerate(counts)}


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


def output_texts(response: pb.ModelInferResponse) -> list[str]:
    """Client side: each output's text (its elements decoded as UTF-8 and joined),
    e.g. one streamed token piece of a generative model."""
    return ["".join(v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
                    for v in array.reshape(-1)) for array in decode_outputs(response).values()]


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
