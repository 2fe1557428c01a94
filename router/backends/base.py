"""The one interface the router core sends calls through (DESIGN.md §7, "Backends
behind one interface").

A ``Backend`` is a connection to one endpoint of one kind: a mesh replica
(``router.backends.mesh``), any Open Inference Protocol server
(``router.backends.oip``) or an OpenAI-compatible HTTP API
(``router.backends.openai_http``). The core never sees a transport: it leases an endpoint
from the model's dispatcher, asks ``Backends`` for that endpoint's backend and
calls it. Unit tests inject fakes of both (``tests/fakes.py``).

Every backend raises ``BackendError`` for what the far side answered or for a
broken connection, with ``started`` telling whether any of the answer reached the
caller (a retry is allowed only before).
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

import grpc

from cmesh.errors import MeshError
from protos import inference_pb2 as pb

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 2**20),
                   ("grpc.max_send_message_length", 64 * 2**20),
                   ("grpc.keepalive_time_ms", 10_000),
                   ("grpc.keepalive_timeout_ms", 5_000),
                   ("grpc.http2.max_pings_without_data", 0)]


class BackendError(MeshError):
    """A backend's error, forwarded with its own status code and reason."""

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


@runtime_checkable
class Backend(Protocol):
    """One endpoint. ``model``/``version`` are the mesh's names: an adapter maps them
    onto its server's. ``external``: calls leave the mesh (cost reports mark them)."""

    address: str
    external: bool

    async def call(self, request: pb.ModelInferRequest, timeout: float) -> pb.ModelInferResponse:
        """One whole answer, free of stream-protocol markers."""

    def stream(self, request: pb.ModelInferRequest, timeout: float) -> AsyncIterator[pb.ModelInferResponse]:
        """The answer's responses as they come (generative models)."""

    async def ready(self, model: str, version: str = "", timeout: float = 5.0) -> bool:
        """Whether the endpoint serves the model now."""

    async def metadata(self, model: str, version: str = "", timeout: float = 10.0) -> pb.ModelMetadataResponse:
        """The model's OIP metadata, under the mesh's names."""

    async def close(self, graceful: bool = False) -> None:
        """``graceful``: let what is in flight finish first (the endpoint is leaving)."""


class Backends(Protocol):
    """Which backend serves a leased endpoint: chosen per model (and pool) from the
    config. ``get`` is on the hot path: implementations cache per endpoint."""

    def get(self, model: str, replica) -> Backend:
        ...

    def retire(self, live: set[str]) -> None:
        """Close (gracefully) every backend whose endpoint left the table."""

    def apply(self, config) -> None:
        """An applied config (``router.live``): adapters of models whose backend
        changed are rebuilt on their next call."""

    async def close(self) -> None:
        ...
