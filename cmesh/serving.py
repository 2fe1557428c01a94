"""Listener set-up shared by every cmesh service: one gRPC server with the mesh's
message limits, and an optional Prometheus port."""
from __future__ import annotations

from collections.abc import Sequence

import grpc
from prometheus_client import CollectorRegistry, start_http_server

from cmesh.config import MeshConfig
from cmesh.decoding import DecodingInterceptor


def grpc_server(config: MeshConfig, interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> grpc.aio.Server:
    """``interceptors`` run first, e.g. ``cmesh.internal_auth.server_interceptors``
    on internal ports, so a caller that is refused costs no decoding."""
    limit = config.server.max_message_bytes
    # so_reuseport off: two servers must never silently share a port. Clients of
    # ours (routers) keep long-lived streams alive with pings every 10 s; accept
    # them instead of answering GOAWAY too_many_pings (the default allows one per 5 min).
    return grpc.aio.server(interceptors=[*interceptors, DecodingInterceptor()], options=[("grpc.max_receive_message_length", limit),
                                    ("grpc.max_send_message_length", limit),
                                    ("grpc.so_reuseport", 0),
                                    ("grpc.keepalive_permit_without_calls", 1),
                                    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
                                    ("grpc.http2.max_ping_strikes", 0)])


def start_metrics(port: int | None, host: str, registry: CollectorRegistry):
    """Serve /metrics from a thread; returns (server, bound port), or (None, None) when off."""
    if port is None:
        return None, None
    http, _ = start_http_server(port, addr=host, registry=registry)
    return http, http.server_port
