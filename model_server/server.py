"""One model-server replica: gRPC listener, metrics port, model loading, drain."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cmesh.config import MeshConfig
from cmesh.internal_auth import server_interceptors
from cmesh.looplag import LoopLagProbe
from cmesh.serving import grpc_server, start_metrics
from cmesh.proc import process_age
from cmesh.store import ModelStore
from cmesh.tls import add_port
from model_server.dataplane import DataPlane
from model_server.metrics import ServerMetrics
from model_server.model_control import servicer_class
from model_server.repository import ModelRepository
from protos import inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


@dataclass
class ServerOptions:
    models: list[str] = field(default_factory=list)   # "name" or "name:variant"
    host: str = "127.0.0.1"
    port: int = 0                                     # 0: pick a free port
    metrics_port: int | None = None                   # None: no metrics listener; 0: free port
    store: str | None = None                          # overrides config.store
    grace_s: float | None = None                      # overrides config.server.drain_grace_s
    drain_delay_s: float | None = None                # overrides config.server.drain_delay_s
    # The mesh-internal token callers must send (cmesh.internal_auth); None: none
    # is checked. Read from the environment by the entry point, never here.
    internal_token: str | None = field(default=None, repr=False)


class Health:
    """Readiness as every protocol sees it: OIP ServerReady and grpc.health.v1."""

    def __init__(self, servicer: health.aio.HealthServicer, metrics: ServerMetrics) -> None:
        self._servicer = servicer
        self._metrics = metrics
        self.ready = False

    async def set(self, ready: bool) -> None:
        self.ready = ready
        status = health_pb2.HealthCheckResponse.SERVING if ready else \
            health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", "inference.GRPCInferenceService"):
            await self._servicer.set(service, status)
        self._metrics.ready.set(1 if ready else 0)


class ModelServer:
    def __init__(self, config: MeshConfig, options: ServerOptions,
                 metrics: ServerMetrics | None = None) -> None:
        self.config = config
        self.options = options
        self.metrics = metrics or ServerMetrics()
        self.store = ModelStore(options.store or config.store)
        self.repository = ModelRepository(config, self.store, self.metrics)
        self.port = 0
        self.metrics_port: int | None = None
        self.cold_start_s: float | None = None
        self._server: grpc.aio.Server | None = None
        self._http = None
        self._stopped = asyncio.Event()
        self._draining = False
        self.loop_lag: LoopLagProbe | None = None

    async def start(self) -> None:
        self._server = grpc_server(self.config, server_interceptors(
            self.config, self.options.internal_token, service="model server"))
        health_servicer = health.aio.HealthServicer()
        self.health = Health(health_servicer, self.metrics)
        await self.health.set(False)
        servicer = servicer_class(self.config.server.model_control)(DataPlane(self.repository), self.health)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self._server)
        self.port = add_port(self._server, f"{self.options.host}:{self.options.port}",
                             self.config.security.server_tls)
        await self._server.start()
        self._http, self.metrics_port = start_metrics(self.options.metrics_port, self.options.host,
                                                      self.metrics.registry)
        for spec in self.options.models:
            name, _, variant = spec.partition(":")
            await self.repository.load(name, [variant] if variant else None)
        self.loop_lag = LoopLagProbe(self.metrics.registry).start()
        self.cold_start_s = process_age()
        self.metrics.cold_start_seconds.set(self.cold_start_s)
        await self.health.set(True)
        log.info("model server ready on port %d (cold start %.2fs)", self.port, self.cold_start_s)

    async def drain(self) -> None:
        """NOT_SERVING first (routers stop sending), then finish in-flight work
        within the grace period, then stop the engines."""
        if self._draining:
            return
        self._draining = True
        await self.health.set(False)
        delay = self.options.drain_delay_s if self.options.drain_delay_s is not None \
            else self.config.server.drain_delay_s
        if delay:
            await asyncio.sleep(delay)
        grace = self.options.grace_s if self.options.grace_s is not None \
            else self.config.server.drain_grace_s
        if self._server is not None:
            await self._server.stop(grace)
        if self.loop_lag is not None:
            self.loop_lag.stop()
        await self.repository.close()
        if self._http is not None:
            self._http.shutdown()
        self._stopped.set()

    async def wait_closed(self) -> None:
        await self._stopped.wait()
