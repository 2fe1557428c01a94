"""Mesh errors as OpenAI's error JSON, with the HTTP status an OpenAI client
expects (its SDK raises ``BadRequestError`` for 400, ``RateLimitError`` for 429 …)."""
from __future__ import annotations

import math

import grpc

from cmesh.errors import MeshError, clip

STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


def http_status(err: MeshError) -> int:
    return STATUS.get(err.code, (500, "server_error"))[0]


def error_body(err: MeshError) -> dict:
    _, kind = STATUS.get(err.code, (500, "server_error"))
    return {"error": {"message": clip(err.message), "type": kind, "param": err.field or None,
                      "code": getattr(err, "reason", None) or err.code.name.lower()}}


def error_headers(err: MeshError) -> dict[str, str]:
    """``Retry-After`` in whole seconds (HTTP's unit), rounded up, when the mesh knows one."""
    if err.retry_after_ms and http_status(err) in (429, 503):
        return {"Retry-After": str(max(1, math.ceil(err.retry_after_ms / 1000)))}
    return {}
