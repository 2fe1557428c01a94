"""The mesh backend: connections from the router to one model-server replica.

Two data paths behind the one ``Backend`` interface, chosen per model
(``backend.data_path``, default ``router.data_path``):
* ``StreamPath`` keeps one long-lived bidi ``ModelStreamInfer`` stream per replica
  and multiplexes every request over it, correlating responses by request id;
* ``UnaryPath`` makes one ``ModelInfer`` call per request.
Both raise ``BackendError`` carrying the replica's status code and whether any
response had started, which decides whether a retry is allowed. Replica channels
carry the mesh-internal token (``cmesh.internal_auth``); nothing here leaves the mesh.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from collections.abc import AsyncIterator

import grpc

from cmesh import wire
from cmesh.internal_auth import MeshCredentials, open_internal_channel
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from router.backends.base import CHANNEL_OPTIONS, BackendError

log = logging.getLogger(__name__)


def error_from_stream(response: pb.ModelStreamInferResponse, started: bool) -> BackendError:
    e = wire.error_of_stream(response)
    return BackendError(e.code, e.message, reason=e.reason, started=started, field=e.field,
                        retryable=e.retryable, retry_after_ms=e.retry_after_ms)


def error_from_rpc(exc: grpc.aio.AioRpcError, started: bool) -> BackendError:
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


class _Describe:
    """Readiness and metadata, asked of the replica itself (shared by both paths)."""

    address: str
    stub: pb_grpc.GRPCInferenceServiceStub
    external = False

    async def ready(self, model: str, version: str = "", timeout: float = 5.0) -> bool:
        try:
            answer = await self.stub.ModelReady(pb.ModelReadyRequest(name=model, version=version),
                                                timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return answer.ready

    async def metadata(self, model: str, version: str = "", timeout: float = 10.0) -> pb.ModelMetadataResponse:
        try:
            return await self.stub.ModelMetadata(pb.ModelMetadataRequest(name=model, version=version),
                                                 timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, started=False) from None


class UnaryPath(_Describe):
    def __init__(self, address: str, credentials: MeshCredentials | None = None) -> None:
        self.address = address
        self.channel = open_channel(address, credentials)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    async def call(self, request: pb.ModelInferRequest, timeout: float) -> pb.ModelInferResponse:
        try:
            return await self.stub.ModelInfer(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, started=False) from None

    async def stream(self, request: pb.ModelInferRequest, timeout: float) -> AsyncIterator[pb.ModelInferResponse]:
        """Streaming responses (generative models) need the stream RPC even here."""
        started = False
        call = self.stub.ModelStreamInfer(iter([request]), timeout=timeout)
        try:
            async for response in call:
                if response.error_message:
                    raise error_from_stream(response, started)
                started = True
                yield response.infer_response
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, started) from None
        finally:
            call.cancel()

    async def close(self, graceful: bool = False) -> None:
        await self.channel.close(grace=30.0 if graceful else None)


class StreamPath(_Describe):
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
                    raise error_from_stream(item, started)
                response = item.infer_response
                final = wire.is_final(response)
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

    async def call(self, request: pb.ModelInferRequest, timeout: float) -> pb.ModelInferResponse:
        """One whole answer (the request carries cmesh-collect, the answer no stream
        marker); a plain coroutine, because unary calls are the hot path and
        generators cost a hop each."""
        request.parameters[wire.P_COLLECT].bool_param = True
        try:
            mailbox = await self._send(request, timeout)
            try:
                item = await mailbox.get()
            finally:
                self._done(request, mailbox)
        finally:
            # Serialised by now (answered, or failed); a retry may go by another path.
            del request.parameters[wire.P_COLLECT]
        if item is _TIMEOUT:
            raise BackendError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"replica {self.address} did not answer within the deadline")
        if isinstance(item, grpc.aio.AioRpcError):
            raise self._broken(item, started=False)
        if item.error_message:
            raise error_from_stream(item, started=False)
        item.infer_response.id = request.id
        return wire.strip_stream_markers(item.infer_response)

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


class MeshBackends:
    """Mesh replicas' backends, one per (data path, address): a replica hosting
    models of both data paths gets one connection per path."""

    def __init__(self, credentials: MeshCredentials | None = None) -> None:
        self.credentials = credentials
        self._paths: dict[tuple[str, str], StreamPath | UnaryPath] = {}

    def get(self, data_path: str, address: str):
        key = (data_path, address)
        path = self._paths.get(key)
        if path is None:
            path = self._paths[key] = make_path(data_path, address, self.credentials)
        return path

    def retire(self, live: set[str]) -> list:
        gone = [k for k in self._paths if k[1] not in live]
        return [self._paths.pop(k) for k in gone]

    def all(self) -> list:
        return list(self._paths.values())
