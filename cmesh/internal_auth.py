"""Mesh-internal authentication (DESIGN.md §2, trust boundaries).

Clients reach only the router's front doors. Replicas and the autoscaler are
internal: they accept only mesh callers, proven by

* mutual TLS, where ``security.server_tls.client_auth`` is set: the TLS handshake
  admits only clients with a certificate the configured CA signed, so a verified
  client certificate suffices and no token is checked; otherwise
* the mesh-internal token: a shared secret in the environment variable that
  ``security.internal_token_env`` names, sent by every internal caller in the
  ``x-cmesh-internal-token`` metadata and compared in constant time.

With neither, internal ports stay open as before, and each service says so once
at start. ``grpc.health.v1.Health`` stays open on every port: kubelet gRPC
probes and compose healthchecks cannot send metadata, and it reveals only
SERVING / NOT_SERVING.

The token is read from the environment only at entry points (``token_from_env``)
and passed down as a value: ``server_interceptors`` for listeners,
``MeshCredentials`` for channels.
"""
from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from cmesh.config import MeshConfig, TLSConfig
from cmesh.errors import Unauthenticated, abort_with
from cmesh.validation import ConfigError

log = logging.getLogger(__name__)

HEADER = "x-cmesh-internal-token"
MIN_TOKEN_CHARS = 16
# Open on every port: probes that cannot authenticate (kubelet, compose).
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
WHERE = "security.internal_token_env"


# ---------------------------------------------------------------- entry points

def token_from_env(config: MeshConfig, environ: Mapping[str, str]) -> str | None:
    """The mesh-internal token, for entry points only: None when the config names
    no variable; a ConfigError when it names one that is unset or too short (a
    service told to require a token must not start open)."""
    name = config.security.internal_token_env
    if name is None:
        return None
    value = (environ.get(name) or "").strip()
    hint = (f"set {name} to the same random secret for every router, replica and autoscaler, "
            f"e.g. export {name}=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    if not value:
        raise ConfigError(WHERE, [f"{WHERE}: the environment variable {name} is not set; {hint}"])
    if len(value) < MIN_TOKEN_CHARS:
        raise ConfigError(WHERE, [f"{WHERE}: {name} is {len(value)} characters; use at least "
                                  f"{MIN_TOKEN_CHARS}: {hint}"])
    return value


def mtls_verifies_clients(config: MeshConfig) -> bool:
    """Whether every listener demands and verifies a client certificate."""
    tls = config.security.server_tls
    return tls is not None and tls.client_auth and tls.ca is not None


# ---------------------------------------------------------------- server side

def _deny_handler(handler: grpc.RpcMethodHandler, err: Unauthenticated) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that only aborts with ``err``."""

    async def deny(request_or_iterator, context):
        await abort_with(context, err)

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler,
             (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Admits a call only with the mesh-internal token in its metadata (except
    ``open_methods``); anything else is answered UNAUTHENTICATED."""

    def __init__(self, token: str, *, service: str, open_methods: frozenset[str] = OPEN_METHODS) -> None:
        if not token:
            raise ValueError("token: must not be empty")
        self._token = token.encode()
        self._open = open_methods
        self._missing = Unauthenticated(
            f"{service}: internal port, for mesh services only: send the mesh-internal token "
            f"(security.internal_token_env) in metadata {HEADER!r}, or connect with a client "
            "certificate where mutual TLS is configured; clients call the router")
        self._wrong = Unauthenticated(f"{service}: the mesh-internal token in {HEADER!r} does not match")

    def admits(self, metadata: Sequence[tuple[str, Any]] | None) -> Unauthenticated | None:
        """None when ``metadata`` carries the token, else the error to answer."""
        for key, value in metadata or ():
            if key == HEADER:
                given = value.encode() if isinstance(value, str) else bytes(value)
                return None if hmac.compare_digest(given, self._token) else self._wrong
        return self._missing

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method in self._open:
            return await continuation(handler_call_details)
        err = self.admits(handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if err is None or handler is None:           # None: an unknown method, gRPC answers UNIMPLEMENTED
            return handler
        return _deny_handler(handler, err)


def server_interceptors(config: MeshConfig, token: str | None, *, service: str) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors an internal listener needs; logs once when it is open."""
    if mtls_verifies_clients(config):
        log.info("%s: internal port authenticated by mutual TLS (client certificates from %s)",
                 service, config.security.server_tls.ca)
        return []
    if token:
        return [TokenInterceptor(token, service=service)]
    log.warning("%s: internal port is UNAUTHENTICATED: anyone who can reach it can call it directly "
                "(bypassing the router's auth, masking and metering); set security.internal_token_env "
                "or mutual TLS (security.server_tls.client_auth)", service)
    return []


# ---------------------------------------------------------------- client side

def _with_token(details: grpc.aio.ClientCallDetails, pair: tuple[str, str]) -> grpc.aio.ClientCallDetails:
    # A copy: the caller's Metadata object may be shared between its calls.
    metadata = grpc.aio.Metadata(*(details.metadata or ()), pair)
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                      details.wait_for_ready)


class _AddToken:
    def __init__(self, token: str) -> None:
        self._pair = (HEADER, token)


# One class per call kind: grpc.aio files each interceptor under the first kind it
# implements only, so one object for all four would miss the streams.
class _UnaryUnaryToken(_AddToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_token(client_call_details, self._pair), request)


class _UnaryStreamToken(_AddToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_with_token(client_call_details, self._pair), request)


class _StreamUnaryToken(_AddToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(_with_token(client_call_details, self._pair), request_iterator)


class _StreamStreamToken(_AddToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(_with_token(client_call_details, self._pair), request_iterator)


def token_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors adding the token to every call of a channel, whatever its
    kind (call credentials would need a secure channel; these work on plaintext too)."""
    return [cls(token) for cls in (_UnaryUnaryToken, _UnaryStreamToken, _StreamUnaryToken, _StreamStreamToken)]


@dataclass(frozen=True)
class MeshCredentials:
    """What a mesh service presents on its internal channels: TLS settings (with a
    client certificate for mutual TLS) and the mesh-internal token, if any."""

    tls: TLSConfig | None = None
    token: str | None = field(default=None, repr=False)

    @classmethod
    def of(cls, config: MeshConfig, token: str | None) -> "MeshCredentials":
        return cls(config.security.client_tls, token)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """For one call on a channel without the interceptor (blocking CLI calls)."""
        return ((HEADER, self.token),) if self.token else ()

    def interceptors(self) -> list[grpc.aio.ClientInterceptor] | None:
        return token_interceptors(self.token) if self.token else None


def open_internal_channel(address: str, credentials: MeshCredentials | None,
                          options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """A grpc.aio channel to a replica or the autoscaler: TLS per ``credentials.tls``,
    and every call carrying the token. No token: no interceptor, no per-call cost."""
    from cmesh.tls import open_channel

    credentials = credentials or MeshCredentials()
    return open_channel(address, credentials.tls, options, interceptors=credentials.interceptors())
