"""Request parameters of the mesh's wire vocabulary, parsed and validated in one
place for the router and the model server: a bad value is INVALID_ARGUMENT
naming the parameter, never an exception deeper in."""
from __future__ import annotations

import math
from typing import Any

from cmesh.errors import InvalidInput, quote

P_PIPELINE = "cmesh-pipeline-id"
P_CLASS = "cmesh-latency-class"
P_REQUEST_ID = "cmesh-request-id"
P_SESSION = "cmesh-session"
P_TIMEOUT_MS = "cmesh-timeout-ms"
LATENCY_CLASSES = ("interactive", "batch")


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
