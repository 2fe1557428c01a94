"""One router replica: OIP + Admin listeners, endpoint source, metrics port."""
from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cmesh.config import MeshConfig
from cmesh.internal_auth import MeshCredentials
from cmesh.looplag import LoopLagProbe
from cmesh.serving import grpc_server, start_metrics
from cmesh.errors import MeshError, abort_with
from router.manifests import ManifestCache
from cmesh.tls import add_port
from protos import inference_pb2_grpc as pb_grpc
from protos import mesh_pb2_grpc
from router.admin import AdminServicer
from router.auth import Authenticator, Gate
from router.core import RouterCore
from router.backends import RouterBackends
from router.endpoints import AutoscalerSource, EndpointTable, ExternalSource, StaticSource
from router.metering import Meter, make_meter
from router.metrics import RouterMetrics
from router.ratelimit import TenantLimiter
from router.servicer import Describer, FrontDoor, RouterServicer, metadata_of
from router.trust_io import FileAudit, MemoryAudit, TrustLayer
from router.trust_pool import MaskPool

log = logging.getLogger(__name__)


@dataclass
class RouterOptions:
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int | None = None
    router_id: str = ""
    # The mesh-internal token for calls to replicas and the autoscaler
    # (cmesh.internal_auth); read from the environment by the entry point only.
    internal_token: str | None = field(default=None, repr=False)
    # Credentials of external backends by model (router.backends.secrets.secrets_from_env),
    # read from the environment by the entry point only.
    backend_secrets: dict[str, str] = field(default_factory=dict, repr=False)
    # The OpenAI-compatible HTTP front door (router.openai); None: not served.
    http_port: int | None = None


class AdminGate(mesh_pb2_grpc.AdminServicer):
    """Admin RPCs only for admin keys; everything else is the AdminServicer's."""

    def __init__(self, inner: AdminServicer, auth: Authenticator) -> None:
        self.inner = inner
        self.auth = auth

    async def CostReport(self, request, context):
        try:
            self.auth.require_admin(self.auth.authenticate(metadata_of(context).get("authorization")))
        except MeshError as exc:
            await abort_with(context, exc)
        return await self.inner.CostReport(request, context)


class _Health:
    def __init__(self) -> None:
        self.ready = False


class RouterServer:
    def __init__(self, config: MeshConfig, options: RouterOptions, *, meter: Meter | None = None,
                 metrics: RouterMetrics | None = None, auth: Authenticator | None = None) -> None:
        self.config = config
        self.options = options
        self.metrics = metrics or RouterMetrics()
        self.meter = meter or make_meter(config.redis_url, metrics=self.metrics)
        self.auth = auth or Authenticator.from_env(config)
        self.table = EndpointTable()
        router_id = options.router_id or f"router-{uuid.uuid4().hex[:8]}"
        self.router_id = router_id
        self._report_task: asyncio.Task | None = None
        self.spans = None
        credentials = MeshCredentials.of(config, options.internal_token)
        if config.router.autoscaler:
            self.source = AutoscalerSource(config.router.autoscaler, self.table, router_id, credentials)
        else:
            self.source = StaticSource(config, self.table)
        self.external = ExternalSource(config, self.table)       # oip backends' endpoints
        sink = FileAudit(config.security.audit_log) if config.security.audit_log else MemoryAudit()
        self.audit = sink
        self.core = RouterCore(config, self.table, self.meter, self.metrics, warm=self.source.warm,
                               trust=TrustLayer(sink, self.metrics, config.server.limits,
                                                pool=MaskPool(config.security.mask_workers)),
                               credentials=credentials,
                               backends=RouterBackends(config, credentials, options.backend_secrets))
        self.health = _Health()
        self.port = 0
        self.http_port: int | None = None
        self.openai = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._http = None
        self._source_task: asyncio.Task | None = None
        self._external_task: asyncio.Task | None = None
        self.loop_lag: LoopLagProbe | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        self._server = grpc_server(self.config)
        door = FrontDoor(self.config, self.auth, Gate(self.config, TenantLimiter(self.config.tenants)))
        # One reader of the store (and of external backends' metadata) for metadata and pipelines.
        manifests = ManifestCache(self.config, describe=self.core.describe)
        describer = Describer(self.core, manifests)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            RouterServicer(self.core, door, self.health, describer), self._server)
        from router.pipelines.metrics import PipelineMetrics
        from router.pipelines.service import PipelineRunner, PipelinesServicer

        if self.config.observability.tracing != "none":
            from router.pipelines.otel import SpanExport

            self.spans = SpanExport(self.config.observability)
        pipelines = PipelineRunner(self.core, door, PipelineMetrics(self.metrics.registry), manifests,
                                   spans=self.spans)
        mesh_pb2_grpc.add_PipelinesServicer_to_server(PipelinesServicer(pipelines), self._server)
        mesh_pb2_grpc.add_AdminServicer_to_server(
            AdminGate(AdminServicer(self.meter, self.config), self.auth), self._server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self._server)
        self.port = add_port(self._server, f"{self.options.host}:{self.options.port}",
                             self.config.security.server_tls)
        await self._server.start()
        if self.options.http_port is not None:
            from router.openai.app import OpenAIFrontDoor

            self.openai = OpenAIFrontDoor(self.core, door, pipelines, manifests)
            self.http_port = await self.openai.start(self.options.host, self.options.http_port,
                                                     self.config.security.server_tls)
        self._http, self.metrics_port = start_metrics(self.options.metrics_port, self.options.host,
                                                      self.metrics.registry)
        self.loop_lag = LoopLagProbe(self.metrics.registry).start()
        self._source_task = asyncio.create_task(self.source.run(), name="endpoint-source")
        await self.external.refresh()               # DNS names resolved before the first request
        self._external_task = asyncio.create_task(self.external.run(), name="external-endpoints")
        if isinstance(self.source, AutoscalerSource):
            from router.load_report import LoadReporter

            reporter = LoadReporter(self.core, self.source.channel, source=self.router_id)
            self._report_task = asyncio.create_task(reporter.run(), name="load-reports")
        self.health.ready = True
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("router ready on port %d (%s endpoints, %s data path)", self.port,
                 "autoscaler" if self.config.router.autoscaler else "static", self.config.router.data_path)

    async def stop(self, grace: float = 5.0) -> None:
        self.health.ready = False
        if self.openai is not None:
            await self.openai.stop(grace)
        if self._server is not None:
            await self._server.stop(grace)
        for task in (self._source_task, self._report_task, self._external_task):
            if task is not None:
                task.cancel()
        if self.loop_lag is not None:
            self.loop_lag.stop()
        await self.core.close()
        if self.spans is not None:
            self.spans.shutdown()
        await self.source.close()
        await self.meter.close()
        if self._http is not None:
            self._http.shutdown()
        self._stopped.set()

    async def wait_closed(self) -> None:
        await self._stopped.wait()
