"""Messages that do not parse are the caller's error: INVALID_ARGUMENT, on every
RPC of every cmesh service.

gRPC itself answers a request whose bytes fail to deserialize with UNKNOWN
("Unexpected <class 'google.protobuf.message.DecodeError'>"), and inside a
``ModelStreamInfer`` stream such a message used to leave the stream hanging. This
interceptor swaps every handler's deserializer for one that returns an
``Undecodable`` marker instead of raising, and answers it:

* unary requests: the call fails with INVALID_ARGUMENT;
* ``ModelStreamInfer``: the marker reaches ``cmesh.rpc.serve_stream``, which
  answers it on the stream and keeps serving the other requests;
* other client streams: the stream fails with INVALID_ARGUMENT.

Wrapped handlers are cached per method, so a call pays one dict lookup.
"""
from __future__ import annotations

import inspect

import grpc

from cmesh.errors import InvalidInput, abort_with

# Streams whose servicer answers an undecodable message itself, per request.
PER_REQUEST_STREAMS = frozenset({"/inference.GRPCInferenceService/ModelStreamInfer"})


class Undecodable:
    """Stands in for a request message whose bytes did not parse. The empty
    names let error answers that echo a request's ids be built from it."""

    __slots__ = ("error", "size")
    model_name = model_version = id = ""

    def __init__(self, error: Exception, size: int) -> None:
        self.error = error
        self.size = size

    def as_error(self) -> InvalidInput:
        return InvalidInput("request", f"the {self.size} bytes received do not parse as the request "
                                       f"message ({type(self.error).__name__})")


def _tolerant(deserializer):
    def decode(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError and whatever else hostile bytes provoke
            return Undecodable(exc, len(data))
    return decode


def _unary_in(behavior):
    if inspect.isasyncgenfunction(behavior):
        async def gen(request, context):
            if isinstance(request, Undecodable):
                await abort_with(context, request.as_error())
            async for response in behavior(request, context):
                yield response
        return gen

    async def call(request, context):
        if isinstance(request, Undecodable):
            await abort_with(context, request.as_error())
        return await behavior(request, context)
    return call


async def _checked(requests, context):
    async for request in requests:
        if isinstance(request, Undecodable):
            await abort_with(context, request.as_error())
        yield request


def _stream_in(behavior):
    if inspect.isasyncgenfunction(behavior):
        async def gen(requests, context):
            async for response in behavior(_checked(requests, context), context):
                yield response
        return gen

    async def call(requests, context):
        return await behavior(_checked(requests, context), context)
    return call


def wrap(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """``handler`` with a deserializer that never raises, and behaviours that answer
    an undecodable message with INVALID_ARGUMENT."""
    if handler.request_deserializer is None:
        return handler
    changes = {"request_deserializer": _tolerant(handler.request_deserializer)}
    if handler.unary_unary is not None:
        changes["unary_unary"] = _unary_in(handler.unary_unary)
    elif handler.unary_stream is not None:
        changes["unary_stream"] = _unary_in(handler.unary_stream)
    elif handler.stream_unary is not None:
        changes["stream_unary"] = _stream_in(handler.stream_unary)
    elif handler.stream_stream is not None and method not in PER_REQUEST_STREAMS:
        changes["stream_stream"] = _stream_in(handler.stream_stream)
    return handler._replace(**changes)


class DecodingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._cache.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = wrap(method, handler)
        self._cache[method] = (handler, wrapped)
        return wrapped
