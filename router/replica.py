"""Connections from the router to one model-server replica.

Two data paths with one interface, chosen by ``router.data_path``:
* ``StreamPath`` keeps one long-lived bidi ``ModelStreamInfer`` stream per replica
  and multiplexes every request over it, correlating responses by request id;
* ``UnaryPath`` makes one ``ModelInfer`` call per request.
Both raise ``BackendError`` carrying the replica's status code and whether any
response had started, which decides whether a retry is allowed.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from collections.abc import AsyncIterator

import grpc

from cmesh.errors import MeshError
from cmesh.internal_auth import MeshCredentials, open_internal_channel
from cmesh.tensors import decode_parameters
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 2**20),
                   ("grpc.max_send_message_length", 64 * 2**20),
                   ("grpc.keepalive_time_ms", 10_000),
                   ("grpc.keepalive_timeout_ms", 5_000),
                   ("grpc.http2.max_pings_without_data", 0)]
FINAL = "triton_final_response"


class BackendError(MeshError):
    """A replica's error, forwarded with its own status code and reason."""

    def __init__(self, code: grpc.StatusCode, message: str, *, reason: str = "", started: bool = False,
                 retryable: bool | None = None, component: str = "", field: str = "",
                 retry_after_ms: int = 0) -> None:
        super().__init__(message, component=component, field=field, retry_after_ms=retry_after_ms)
        self.code = code                      # instance attributes shadow the class defaults
        self.reason = reason or code.name.lower()
        self.retryable = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED) \
            if retryable is None else retryable
        self.started = started
        self.caller_deadline = False     # set by the router when the caller's time ran out


def _error_from_stream(response: pb.ModelStreamInferResponse, started: bool) -> BackendError:
    params = decode_parameters(response.infer_response.parameters)
    code_name, _, message = response.error_message.partition(": ")
    code = getattr(grpc.StatusCode, str(params.get("cmesh-error-code") or code_name), grpc.StatusCode.INTERNAL)
    return BackendError(code, message or response.error_message, reason=str(params.get("cmesh-error-reason", "")),
                        started=started, field=str(params.get("cmesh-error-field", "")),
                        retryable=params.get("cmesh-retryable"),
                        retry_after_ms=int(params.get("cmesh-retry-after-ms", 0) or 0))


def _error_from_rpc(exc: grpc.aio.AioRpcError, started: bool) -> BackendError:
    from cmesh.errors import component_error_of

    remote = component_error_of(exc)
    detail = remote.detail
    return BackendError(remote.code, remote.message, started=started,
                        reason=detail.reason if detail else "",
                        retryable=detail.retryable if detail else None,
                        field=detail.field if detail else "",
                        retry_after_ms=detail.retry_after_ms if detail else 0)


def open_channel(address: str, credentials: MeshCredentials | None) -> grpc.aio.Channel:
    """A channel to a replica: TLS settings plus the mesh-internal token, which every
    call then carries (one client interceptor; none, and no per-call cost, without
    a token)."""
    return open_internal_channel(address, credentials, CHANNEL_OPTIONS)


_TIMEOUT = object()


class _Mailbox:
    """Responses for one request on a shared stream. Lighter than an asyncio.Queue
    on the hot path: a deque plus one future while the consumer waits."""

    __slots__ = ("items", "waiter", "wire_id", "client_id", "timer")

    def __init__(self, wire_id: str, client_id: str) -> None:
        self.items: collections.deque = collections.deque()
        self.waiter: asyncio.Future | None = None
        self.wire_id, self.client_id = wire_id, client_id
        self.timer: asyncio.TimerHandle | None = None

    def put(self, item) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(item)
            self.waiter = None
        else:
            self.items.append(item)

    async def get(self):
        if self.items:
            return self.items.popleft()
        self.waiter = asyncio.get_running_loop().create_future()
        return await self.waiter


class UnaryPath:
    def __init__(self, address: str, credentials: MeshCredentials | None = None) -> None:
        self.address = address
        self.channel = open_channel(address, credentials)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    async def call_once(self, request: pb.ModelInferRequest, timeout: float) -> pb.ModelInferResponse:
        try:
            return await self.stub.ModelInfer(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise _error_from_rpc(exc, started=False) from None

    async def stream(self, request: pb.ModelInferRequest, timeout: float) -> AsyncIterator[pb.ModelInferResponse]:
        """Streaming responses (generative models) need the stream RPC even here."""
        started = False
        call = self.stub.ModelStreamInfer(iter([request]), timeout=timeout)
        try:
            async for response in call:
                if response.error_message:
                    raise _error_from_stream(response, started)
                started = True
                yield response.infer_response
        except grpc.aio.AioRpcError as exc:
            raise _error_from_rpc(exc, started) from None
        finally:
            call.cancel()

    async def close(self, graceful: bool = False) -> None:
        await self.channel.close(grace=30.0 if graceful else None)


class StreamPath:
    """One bidi stream per replica, many requests in flight on it."""

    def __init__(self, address: str, credentials: MeshCredentials | None = None) -> None:
        self.address = address
        self.channel = open_channel(address, credentials)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self._ids = itertools.count(1)
        self._outbox: asyncio.Queue | None = None
        self._pending: dict[str, _Mailbox] = {}
        self._reader: asyncio.Task | None = None
        self._call = None
        self._lock = asyncio.Lock()
        self._unary = UnaryPath.__new__(UnaryPath)     # shares this channel for fallbacks
        self._unary.address, self._unary.channel, self._unary.stub = address, self.channel, self.stub

    async def _ensure_stream(self) -> asyncio.Queue:
        if self._outbox is not None and self._reader is not None and not self._reader.done():
            return self._outbox
        async with self._lock:
            if self._outbox is not None and self._reader is not None and not self._reader.done():
                return self._outbox
            outbox: asyncio.Queue = asyncio.Queue()

            async def requests():
                while (item := await outbox.get()) is not None:
                    yield item

            self._call = self.stub.ModelStreamInfer(requests())
            self._outbox = outbox
            self._reader = asyncio.create_task(self._read(self._call, outbox),
                                               name=f"replica-stream-{self.address}")
            return outbox

    async def _read(self, call, outbox: asyncio.Queue) -> None:
        error: BaseException | None = None
        try:
            async for response in call:
                mailbox = self._pending.get(response.infer_response.id)
                if mailbox is not None:
                    mailbox.put(response)
        except grpc.aio.AioRpcError as exc:
            error = exc
        except asyncio.CancelledError:
            error = grpc.aio.AioRpcError(grpc.StatusCode.CANCELLED, None, None, "stream closed")
            raise
        finally:
            if self._outbox is outbox:
                self._outbox = None
            # End the request generator too: gRPC's task feeding the stream waits in
            # it, and would otherwise stay pending until garbage collection.
            outbox.put_nowait(None)
            # Everyone still waiting on this stream learns it broke.
            exc = error or grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None,
                                                f"stream to {self.address} ended")
            for mailbox in list(self._pending.values()):
                mailbox.put(exc)

    async def _send(self, request: pb.ModelInferRequest, timeout: float) -> _Mailbox:
        """Queue ``request`` on the stream under a wire id of its own (clients' ids
        may repeat); its answers, or ``_TIMEOUT`` at the deadline, come to the
        returned mailbox. The request carries the wire id until it is serialised,
        so the caller ends every exchange with ``_done``, which restores it."""
        outbox = await self._ensure_stream()
        mailbox = _Mailbox(f"{next(self._ids)}", request.id)
        request.id = mailbox.wire_id
        self._pending[mailbox.wire_id] = mailbox
        mailbox.timer = asyncio.get_running_loop().call_later(timeout, mailbox.put, _TIMEOUT)
        outbox.put_nowait(request)
        return mailbox

    def _done(self, request: pb.ModelInferRequest, mailbox: _Mailbox) -> None:
        mailbox.timer.cancel()
        self._pending.pop(mailbox.wire_id, None)
        request.id = mailbox.client_id

    async def _exchange(self, request: pb.ModelInferRequest, timeout: float) -> AsyncIterator[pb.ModelInferResponse]:
        mailbox = await self._send(request, timeout)
        client_id = mailbox.client_id
        started = False
        try:
            while True:
                item = await mailbox.get()
                if item is _TIMEOUT:
                    raise TimeoutError
                if isinstance(item, grpc.aio.AioRpcError):
                    raise self._broken(item, started)
                if item.error_message:
                    raise _error_from_stream(item, started)
                response = item.infer_response
                final = response.parameters[FINAL].bool_param if FINAL in response.parameters else True
                response.id = client_id
                started = True
                yield response
                if final:
                    return
        except TimeoutError:
            raise BackendError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"replica {self.address} did not answer within the deadline",
                               started=started) from None
        finally:
            self._done(request, mailbox)

    async def call_once(self, request: pb.ModelInferRequest, timeout: float) -> pb.ModelInferResponse:
        """One whole answer (the request carries cmesh-collect); a plain coroutine,
        because unary calls are the hot path and generators cost a hop each."""
        mailbox = await self._send(request, timeout)
        try:
            item = await mailbox.get()
        finally:
            self._done(request, mailbox)
        if item is _TIMEOUT:
            raise BackendError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"replica {self.address} did not answer within the deadline")
        if isinstance(item, grpc.aio.AioRpcError):
            raise self._broken(item, started=False)
        if item.error_message:
            raise _error_from_stream(item, started=False)
        item.infer_response.id = request.id
        return item.infer_response

    def _broken(self, err: grpc.aio.AioRpcError, started: bool) -> BackendError:
        # The shared stream failing is the connection failing (a killed replica
        # gives UNKNOWN "Stream removed"), never an answer about this request: it
        # is UNAVAILABLE, so it is retried while nothing has reached the caller.
        return BackendError(grpc.StatusCode.UNAVAILABLE,
                            f"replica {self.address}: stream broke ({err.code().name}: "
                            f"{err.details() or 'no detail'})", started=started, retryable=True)

    stream = _exchange

    async def close(self, graceful: bool = False, grace_s: float = 30.0) -> None:
        """``graceful``: end our side of the stream and let every pending request get
        its answer (the replica is draining) before closing."""
        if self._outbox is not None:
            self._outbox.put_nowait(None)
        if graceful and self._reader is not None and self._pending:
            try:
                await asyncio.wait_for(asyncio.shield(self._reader), timeout=grace_s)
            except (TimeoutError, Exception):  # noqa: BLE001 - closing anyway
                pass
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - closing anyway
                pass
        await self.channel.close()


def make_path(kind: str, address: str, credentials: MeshCredentials | None = None):
    return StreamPath(address, credentials) if kind == "stream" else UnaryPath(address, credentials)
