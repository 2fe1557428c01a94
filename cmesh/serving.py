"""Listener set-up shared by every cmesh service: one gRPC server with the mesh's
message limits, and an optional Prometheus port."""
from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, start_http_server

from cmesh.config import MeshConfig


def grpc_server(config: MeshConfig) -> grpc.aio.Server:
    limit = config.server.max_message_bytes
    # so_reuseport off: two servers must never silently share a port.
    return grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                    ("grpc.max_send_message_length", limit),
                                    ("grpc.so_reuseport", 0)])


def start_metrics(port: int | None, host: str, registry: CollectorRegistry):
    """Serve /metrics from a thread; returns (server, bound port), or (None, None) when off."""
    if port is None:
        return None, None
    http, _ = start_http_server(port, addr=host, registry=registry)
    return http, http.server_port
