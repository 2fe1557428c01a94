"""One router replica: OIP + Admin listeners, endpoint source, metrics port."""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cmesh.config import MeshConfig
from cmesh.errors import MeshError, abort_with
from cmesh.internal_auth import MeshCredentials
from cmesh.looplag import LoopLagProbe
from cmesh.rpc import guarded
from cmesh.serving import grpc_server, start_metrics
from cmesh.tls import add_port
from protos import inference_pb2_grpc as pb_grpc
from protos import mesh_pb2_grpc
from router.admin import AdminServicer
from router.admin_config import ConfigAdmin
from router.auth import Authenticator, Gate, Principal
from router.core import RouterCore
from router.live import ConfigFollower
from router.manifests import ManifestCache
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
    # Live configuration (router.live): the entry point's flags, re-applied to every
    # config the autoscaler sends; the file's text (to know the autoscaler's first
    # config is this same file); the environment that names tenants' keys.
    overrides: dict = field(default_factory=dict)
    file_text: str = field(default="", repr=False)
    environ: Mapping[str, str] | None = field(default=None, repr=False)


class AdminGate(mesh_pb2_grpc.AdminServicer):
    """Admin RPCs only for admin keys; everything else is the AdminServicer's and
    ConfigAdmin's. ``auth`` is read per call: an applied config may change the keys."""

    def __init__(self, inner: AdminServicer, configs: ConfigAdmin, auth: Callable[[], Authenticator]) -> None:
        self.inner = inner
        self.configs = configs
        self._auth = auth

    def _admin(self, context) -> Principal:
        auth = self._auth()
        principal = auth.authenticate(metadata_of(context).get("authorization"))
        auth.require_admin(principal)
        return principal

    async def CostReport(self, request, context):
        try:
            self._admin(context)
        except MeshError as exc:
            await abort_with(context, exc)
        return await self.inner.CostReport(request, context)

    @guarded
    async def ApplyConfig(self, request, context):
        return await self.configs.apply(request, self._admin(context))

    @guarded
    async def ConfigHistory(self, request, context):
        self._admin(context)
        return await self.configs.history(request)

    @guarded
    async def RolloutStatus(self, request, context):
        self._admin(context)
        return await self.configs.rollouts(request)


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
        self.auth = auth or Authenticator.from_env(config, options.environ)
        self._fixed_auth = auth is not None      # injected by a test: kept across applies
        self.table = EndpointTable()
        router_id = options.router_id or f"router-{uuid.uuid4().hex[:8]}"
        self.router_id = router_id
        self._report_task: asyncio.Task | None = None
        self.spans = None
        credentials = MeshCredentials.of(config, options.internal_token)
        self.follower = ConfigFollower(self.apply, options.overrides, options.file_text)
        if config.router.autoscaler:
            self.source = AutoscalerSource(config.router.autoscaler, self.table, router_id, credentials,
                                           on_config=self.follower.on_record)
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
        door = self.door = FrontDoor(self.config, self.auth, Gate(self.config, TenantLimiter(self.config.tenants)))
        # One reader of the store (and of external backends' metadata) for metadata and pipelines.
        manifests = self.manifests = ManifestCache(self.config, describe=self.core.describe)
        describer = Describer(self.core, manifests)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            RouterServicer(self.core, door, self.health, describer), self._server)
        from router.pipelines.metrics import PipelineMetrics
        from router.pipelines.service import PipelineRunner, PipelinesServicer

        if self.config.observability.tracing != "none":
            from router.pipelines.otel import SpanExport

            self.spans = SpanExport(self.config.observability)
        pipelines = self.pipelines = PipelineRunner(self.core, door, PipelineMetrics(self.metrics.registry),
                                                    manifests, spans=self.spans)
        mesh_pb2_grpc.add_PipelinesServicer_to_server(PipelinesServicer(pipelines), self._server)
        channel = self.source.channel if isinstance(self.source, AutoscalerSource) else None
        self.configs = ConfigAdmin(channel, self.follower)
        mesh_pb2_grpc.add_AdminServicer_to_server(
            AdminGate(AdminServicer(self.meter, lambda: self.config), self.configs,
                      lambda: self.door.auth), self._server)
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

    def apply(self, config: MeshConfig) -> None:
        """Swap an applied config into every part (``router.live``). What can refuse
        it is built first, so a refusal changes nothing; then each part takes the
        new config, keeping its state: queues and in-flight calls, breakers,
        rate-limit tokens, metering, channels to replicas that stay."""
        graphs = self.pipelines.build_graphs(config)
        auth = self.auth if self._fixed_auth else Authenticator.from_env(config, self.options.environ)
        self.config, self.auth = config, auth
        self.door.apply(config, auth)
        self.manifests.apply(config)
        self.pipelines.apply(graphs)
        self.core.apply(config)
        self.external.apply(config)
        if isinstance(self.source, StaticSource):
            self.source.apply(config)

    async def reload_file(self, path: str) -> None:
        """SIGHUP: with an autoscaler, the file goes to it as an apply (one history,
        every router follows); a router with static endpoints applies it itself."""
        from pathlib import Path

        from cmesh.config_apply import parse_text, refusal
        from cmesh.validation import ConfigError

        try:
            text = Path(path).read_text()
            if isinstance(self.source, AutoscalerSource):
                resp = await self.configs.reload(text, self.router_id)
                log.info("SIGHUP: %s applied as %s (%d change(s))", path, resp.record.id, len(resp.changes))
                return
            self.apply(parse_text(text, self.config, self.options.overrides))
            log.info("SIGHUP: reloaded %s", path)
        except ConfigError as exc:
            log.error("SIGHUP: %s refused: %s", path, refusal(exc).message)
        except OSError as exc:
            log.error("SIGHUP: %s not applied: %s", path, exc)
        except MeshError as exc:                   # the autoscaler refused it, or is away
            log.error("SIGHUP: %s not applied: %s", path, exc.message)

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
