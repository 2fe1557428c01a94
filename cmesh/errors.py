"""Domain errors and their one mapping to gRPC status codes.

Code raises these; one interceptor-like helper (``abort_with``) turns them into a
status with a ``cmesh.v1.ComponentError`` in the rich error details, so no
servicer maps exceptions by hand and nothing of ours answers UNKNOWN.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import grpc
from google.rpc import code_pb2, status_pb2
from grpc_status import rpc_status

from protos import mesh_pb2


# Longest text of a caller's that an error quotes back: a 100 KB model name must
# not make the answer exceed gRPC's metadata limit (the client would see
# RESOURCE_EXHAUSTED instead of our status), nor fill the logs.
QUOTE_LIMIT = 80
MESSAGE_LIMIT = 1024
DETAIL_LIMIT = 256


def clip(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """``text`` cut to ``limit`` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """repr() of a caller's value for an error message, at most ``limit`` characters of it."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} long)"
    return clip(repr(value), limit + 2)


class MeshError(Exception):
    """An error a caller can act on. Subclasses fix the status code and reason."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    reason: ClassVar[str] = "internal"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, component: str = "", field: str = "",
                 retry_after_ms: int = 0, pipeline: str = "", node: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.component = component
        self.field = field
        self.retry_after_ms = retry_after_ms
        self.pipeline = pipeline
        self.node = node

    def detail(self) -> mesh_pb2.ComponentError:
        return mesh_pb2.ComponentError(
            component=clip(self.component, DETAIL_LIMIT), pipeline=clip(self.pipeline, DETAIL_LIMIT),
            reason=self.reason, retryable=self.retryable, retry_after_ms=self.retry_after_ms,
            field=clip(self.field, DETAIL_LIMIT), node=clip(self.node, DETAIL_LIMIT))


class InvalidInput(MeshError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "invalid_input"

    def __init__(self, field: str, message: str, **kw) -> None:
        # The field leads the message so every client sees what to fix.
        field = clip(field, DETAIL_LIMIT)
        super().__init__(f"{field}: {message}" if field else message, field=field, **kw)


class NotFound(MeshError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "not_found"


class ResourceExhausted(MeshError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "queue_full"
    retryable = True


class Unavailable(MeshError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "unavailable"
    retryable = True


class Draining(Unavailable):
    reason = "draining"


class DeadlineExceeded(MeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "deadline"
    retryable = False


class Unauthenticated(MeshError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "unauthenticated"


class PermissionDenied(MeshError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "permission_denied"


class FailedPrecondition(MeshError):
    """The server's configuration does not allow the operation (e.g. model control
    is off); not the caller's identity, and retrying will not help."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "failed_precondition"


class Internal(MeshError):
    code = grpc.StatusCode.INTERNAL
    reason = "internal"


_GRPC_TO_RPC_CODE = {c: getattr(code_pb2, c.name) for c in grpc.StatusCode}


def to_status(err: MeshError) -> grpc.Status:
    """A grpc.Status whose trailing metadata carries the ComponentError detail."""
    # Clipped here, once, whatever the raiser quoted: status and details travel in
    # trailing metadata, which has a size limit.
    status = status_pb2.Status(code=_GRPC_TO_RPC_CODE[err.code], message=clip(err.message))
    status.details.add().Pack(err.detail())
    return rpc_status.to_status(status)


async def abort_with(context: grpc.aio.ServicerContext, err: MeshError) -> None:
    await context.abort_with_status(to_status(err))


@dataclass(frozen=True)
class RemoteError:
    """What a client learns from a failed call: status, message and detail."""

    code: grpc.StatusCode
    message: str
    detail: mesh_pb2.ComponentError | None


def component_error_of(err: grpc.aio.AioRpcError | grpc.RpcError) -> RemoteError:
    """Parse the status and ComponentError (if any) out of a failed call."""
    detail = None
    status = rpc_status.from_call(err) if hasattr(err, "trailing_metadata") else None
    if status is not None:
        for any_msg in status.details:
            candidate = mesh_pb2.ComponentError()
            if any_msg.Unpack(candidate):
                detail = candidate
                break
    return RemoteError(code=err.code(), message=err.details() or "", detail=detail)
