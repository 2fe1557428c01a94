"""The mesh's wire vocabulary in one place (DESIGN.md §2, §7 "One protocol
vocabulary"): every ``cmesh-*`` parameter key, Triton's stream marker, their
parsers and writers, and the error codec of the ModelStreamInfer stream in both
directions (``stream_error`` writes what ``error_of_stream`` reads).

Request parameters are parsed and validated here for the router and the model
server: a bad value is INVALID_ARGUMENT naming the parameter, never an exception
deeper in.

Timings (``cmesh-compute-ms``, ``cmesh-queue-ms``, ``cmesh-router-queue-ms``,
``cmesh-cold-start-ms``) travel as ``string_param`` holding the number of
milliseconds (Python's shortest round-trip repr, so nothing is lost): KServe's own
``InferParameter`` has no ``double_param`` (only Triton's has), so a KServe or any
OIP client reads them as ``float(p.string_param)``. ``ms`` reads both forms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import grpc

from cmesh.errors import DETAIL_LIMIT, InvalidInput, MeshError, clip, quote

# -- request parameters (and metadata of the same name) -------------------------------
P_PIPELINE = "cmesh-pipeline-id"
P_CLASS = "cmesh-latency-class"
P_REQUEST_ID = "cmesh-request-id"
P_SESSION = "cmesh-session"
P_TIMEOUT_MS = "cmesh-timeout-ms"      # remaining deadline, per request on a shared stream
P_COLLECT = "cmesh-collect"            # answer a stream request in one response (router's stream path)
M_TENANT = "cmesh-tenant"              # metadata: the tenant a caller claims
LATENCY_CLASSES = ("interactive", "batch")

# -- response parameters --------------------------------------------------------------
P_COMPUTE_MS = "cmesh-compute-ms"      # the replica's compute: this request's share of its batches
P_QUEUE_MS = "cmesh-queue-ms"          # queued in the replica
P_BATCH_SIZE = "cmesh-batch-size"
P_INPUT_TOKENS = "cmesh-input-tokens"
P_OUTPUT_TOKENS = "cmesh-output-tokens"
P_ROUTER_QUEUE_MS = "cmesh-router-queue-ms"   # queued in the router before dispatch
P_COLD_START_MS = "cmesh-cold-start-ms"       # of which: held for a first replica
P_ATTEMPTS = "cmesh-attempts"                 # attempts it took, when more than one
P_EXTERNAL = "cmesh-external"                 # answered by an external (oip) backend
P_SOURCE = "cmesh-source"                     # the store version the replica loaded for the variant
P_FINAL = "triton_final_response"             # Triton's marker of a stream's last response
STREAM_MARKERS = (P_FINAL,)                   # never on a unary answer

# -- errors on the ModelStreamInfer stream ---------------------------------------------
P_ERROR_CODE = "cmesh-error-code"
P_ERROR_REASON = "cmesh-error-reason"
P_ERROR_FIELD = "cmesh-error-field"
P_ERROR_COMPONENT = "cmesh-error-component"
P_RETRYABLE = "cmesh-retryable"
P_RETRY_AFTER_MS = "cmesh-retry-after-ms"


def set_param(params: Any, key: str, value: Any) -> None:
    """Write a python value into a protobuf map<string, InferParameter>."""
    from cmesh.tensors import set_param as _set

    _set(params, key, value)


def ms_text(milliseconds: float) -> str:
    """A timing as the wire carries it: the number of milliseconds as text."""
    return repr(float(milliseconds))


def set_ms(params: Any, key: str, milliseconds: float) -> None:
    params[key].string_param = repr(float(milliseconds))


def ms(value: Any) -> float:
    """A timing read back: a number or numeric text (both forms a peer may send);
    0.0 when absent, malformed, negative or not finite."""
    try:
        number = float(value or 0.0)
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) and number >= 0 else 0.0


def strip_stream_markers(response: Any) -> Any:
    """A unary answer carries no stream-protocol marker (in place; returns it)."""
    params = response.parameters
    for key in STREAM_MARKERS:
        if key in params:
            del params[key]
    return response


def is_final(response: Any) -> bool:
    """Whether a streamed response is its request's last (absent marker: it is)."""
    params = response.parameters
    return params[P_FINAL].bool_param if P_FINAL in params else True


def stream_error(request: Any, exc: MeshError) -> Any:
    """Triton's stream carries errors as text; the status and detail also travel as
    parameters so a router can map them back to a code without parsing text."""
    from cmesh import tensors
    from protos import inference_pb2 as pb

    resp = pb.ModelStreamInferResponse(error_message=f"{exc.code.name}: {clip(exc.message)}")
    ir = resp.infer_response
    # The names are the caller's own (it correlates by id), but clipped all the same.
    ir.model_name, ir.model_version = clip(request.model_name, DETAIL_LIMIT), clip(request.model_version, DETAIL_LIMIT)
    ir.id = request.id
    for key, value in ((P_ERROR_CODE, exc.code.name), (P_ERROR_REASON, exc.reason),
                       (P_ERROR_FIELD, clip(exc.field, DETAIL_LIMIT)), (P_RETRYABLE, exc.retryable),
                       (P_RETRY_AFTER_MS, exc.retry_after_ms),
                       (P_ERROR_COMPONENT, clip(exc.component, DETAIL_LIMIT)),
                       (P_FINAL, True)):
        tensors.set_param(ir.parameters, key, value)
    return resp


@dataclass(frozen=True)
class WireError:
    """An error as a stream response carried it (``stream_error``'s fields)."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    field: str = ""
    component: str = ""
    retryable: bool | None = None
    retry_after_ms: int = 0


def error_of_stream(response: Any) -> WireError:
    """The reverse of ``stream_error``, for our peers' stream errors and any other
    server's (Triton's text only: ``error_message`` alone, code INTERNAL unless the
    text starts with a status name)."""
    from cmesh.tensors import decode_parameters

    params = decode_parameters(response.infer_response.parameters)
    code_name, _, message = response.error_message.partition(": ")
    code = getattr(grpc.StatusCode, str(params.get(P_ERROR_CODE) or code_name), None)
    if not isinstance(code, grpc.StatusCode):
        code, message = grpc.StatusCode.INTERNAL, response.error_message
    retryable = params.get(P_RETRYABLE)
    try:
        retry_after_ms = max(0, int(params.get(P_RETRY_AFTER_MS, 0) or 0))
    except (TypeError, ValueError):
        retry_after_ms = 0
    return WireError(code=code, message=message or response.error_message,
                     reason=str(params.get(P_ERROR_REASON, "") or ""), field=str(params.get(P_ERROR_FIELD, "") or ""),
                     component=str(params.get(P_ERROR_COMPONENT, "") or ""),
                     retryable=retryable if isinstance(retryable, bool) else None,
                     retry_after_ms=retry_after_ms)


def timeout_s(value: Any) -> float | None:
    """``cmesh-timeout-ms`` as seconds (None when absent): a finite number > 0,
    given as a number or a numeric string."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidInput(P_TIMEOUT_MS, f"must be a number of milliseconds, got {value!r}")
    try:
        ms = float(value)
    except (TypeError, ValueError):
        raise InvalidInput(P_TIMEOUT_MS, f"must be a number of milliseconds, got {quote(value)}") from None
    if not math.isfinite(ms) or ms <= 0:
        raise InvalidInput(P_TIMEOUT_MS, f"must be a finite number of milliseconds > 0, got {quote(value)}")
    return ms / 1000.0


def text(key: str, value: Any, limit: int) -> str:
    """An identifier-like parameter (request id, pipeline id, session): a string of
    at most ``limit`` characters; absent is ''."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str):
        raise InvalidInput(key, f"must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise InvalidInput(key, f"is {len(value)} characters long; the limit is {limit}")
    return value


def latency_class(value: str) -> str:
    if value and value not in LATENCY_CLASSES:
        raise InvalidInput(P_CLASS, f"must be 'interactive' or 'batch', got {quote(value)}")
    return value
