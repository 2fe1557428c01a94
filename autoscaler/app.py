"""Wiring of one autoscaler process: provider, controller, lease, gRPC, metrics."""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import uuid
from argparse import Namespace
from collections.abc import Mapping
from pathlib import Path

from autoscaler.config_history import ConfigHistory, Record
from autoscaler.controller import Controller
from autoscaler.leader import make_lease
from autoscaler.live import LiveConfig, record_proto
from autoscaler.rollouts import RolloutDriver
from autoscaler.metrics import AutoscalerMetrics
from autoscaler.service import AutoscalerServicer
from cmesh.config import MeshConfig, load_config, redis_url, with_overrides
from cmesh.internal_auth import MeshCredentials, server_interceptors, token_from_env
from cmesh.serving import grpc_server, start_metrics
from cmesh.tls import add_port
from protos import mesh_pb2_grpc

log = logging.getLogger(__name__)


def make_provider(config: MeshConfig, args: Namespace, credentials: MeshCredentials | None = None):
    if config.autoscaler.provider == "kubernetes":
        from autoscaler.providers.kubernetes import KubernetesProvider

        return KubernetesProvider(config)
    from autoscaler.providers.local import LocalProvider

    # Replicas listen where the advertised name reaches them: loopback stays
    # loopback; any other name (a compose service, a host name) needs all interfaces.
    loopback = args.advertise_host in ("127.0.0.1", "localhost", "::1")
    return LocalProvider(config, args.config, host="127.0.0.1" if loopback else "0.0.0.0",
                         advertise_host=args.advertise_host, zygote=not args.no_fork_server,
                         state_dir=args.state_dir,
                         credentials=credentials)


class Autoscaler:
    """Leads (runs the loop and the provider) while it holds the lease; as a
    standby it serves Status and waits, publishing no table."""

    def __init__(self, config: MeshConfig, args: Namespace, credentials: MeshCredentials | None = None) -> None:
        self.config = config
        self.args = args
        self.metrics = AutoscalerMetrics()
        self.provider = make_provider(config, args, credentials)
        self.controller = Controller(config, self.provider, metrics=self.metrics)
        self.leading = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self.rollouts = None                    # autoscaler.rollouts.RolloutDriver, set by serve()
        self.live = None                        # autoscaler.live.LiveConfig, set by serve()
        self.elected = False
        self._rollout_task: asyncio.Task | None = None
        self.monitor = None                     # per-model readiness probe, where the provider can replace
        self._monitor_task: asyncio.Task | None = None
        if hasattr(self.provider, "replace"):
            from autoscaler.prober import ReadinessMonitor, ReplicaProber

            probe = config.autoscaler.readiness_probe
            self.monitor = ReadinessMonitor(self.provider, ReplicaProber(credentials, probe.timeout_s), probe)

    async def follow(self, config: MeshConfig, path: str, record: Record, text: str) -> None:
        """Obey an applied config (autoscaler.live): the controller and provider
        first, so the table that carries the config to routers has its replicas."""
        self.config = config
        await self.controller.apply(config, path, record.id)
        await self.controller.publisher.set_config(record_proto(record, text))
        if self.leading.is_set():
            await self.controller.tick()

    async def on_elected(self) -> None:
        log.info("leading: adopting running replicas and starting the control loop")
        self.elected = True                     # the config mirror is the leader's to write
        if hasattr(self.provider, "adopt"):
            await self.provider.adopt()
        if self.live is not None:
            await self.live.adopt_mirrored()    # the previous leader's applied config, if newer
        await self.controller._publish()
        self._loop_task = asyncio.create_task(self.controller.run(), name="control-loop")
        if self.rollouts is not None:
            self._rollout_task = asyncio.create_task(self.rollouts.run(self.config.autoscaler.tick_s),
                                                     name="rollouts")
        if self.monitor is not None:
            self._monitor_task = asyncio.create_task(self.monitor.run(), name="readiness-probe")
        self.metrics.leader.set(1)
        self.leading.set()

    async def on_lost(self) -> None:
        log.warning("lost the leader lease: stopping the control loop")
        self.stop_leading()

    def stop_leading(self) -> None:
        for task in (self._loop_task, self._monitor_task, self._rollout_task):
            if task is not None:
                task.cancel()
        self.metrics.leader.set(0)
        self.leading.clear()
        self.elected = False


async def serve(args: Namespace, environ: Mapping[str, str]) -> int:
    config = with_overrides(load_config(args.config), {"autoscaler.provider": args.provider})
    listen = args.listen or config.autoscaler.listen
    redis = redis_url(args.redis, config, environ)
    token = token_from_env(config, environ)  # before anything starts: a ConfigError exits 2
    app = Autoscaler(config, args, MeshCredentials.of(config, token))
    if hasattr(app.provider, "start"):
        await app.provider.start()            # e.g. the local fork server's imports, before we say ready
    mirror = None
    if redis:
        from autoscaler.config_mirror import RedisConfigMirror

        mirror = RedisConfigMirror(redis)
    live = app.live = LiveConfig(config, ConfigHistory(Path(args.state_dir) / "configs"), app.follow,
                                 overrides={"autoscaler.provider": config.autoscaler.provider}, mirror=mirror,
                                 leading=lambda: app.elected)
    await live.start(Path(args.config).read_text(), args.config)
    app.rollouts = RolloutDriver(live, app.metrics, state_path=Path(args.state_dir) / "configs" / "rollouts.json")
    servicer = AutoscalerServicer(app.controller, leading=app.leading, live=live, rollouts=app.rollouts)
    server = grpc_server(config, server_interceptors(config, token, service="autoscaler"))
    mesh_pb2_grpc.add_AutoscalerServicer_to_server(servicer, server)
    port = add_port(server, listen, config.security.server_tls)
    await server.start()
    http, metrics_port = start_metrics(args.metrics_port, listen.rsplit(":", 1)[0], app.metrics.registry)
    lease = make_lease(redis, holder_id=f"autoscaler-{uuid.uuid4().hex[:8]}",
                       ttl_s=config.autoscaler.lease_ttl_s)
    lease_task = asyncio.create_task(lease.run(app.on_elected, app.on_lost), name="leader-lease")
    print(json.dumps({"event": "ready", "port": port, "metrics_port": metrics_port,
                      "provider": config.autoscaler.provider, "leader_election": "redis" if redis else "none"}),
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task] = set()

    def on_sighup() -> None:                  # reload the file, as `cmesh apply` would
        task = asyncio.ensure_future(live.reload_file(args.config))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    await stop.wait()
    log.info("stopping: draining every replica")
    lease_task.cancel()
    app.stop_leading()                        # a clean stop: the lease is released below
    await app.provider.close()
    await lease.release()
    await lease.close()
    if mirror is not None:
        await mirror.close()
    await server.stop(2.0)
    if http is not None:
        http.shutdown()
    return 0


def run(args: Namespace, environ: Mapping[str, str]) -> int:
    from cmesh.proc import run_service

    return run_service(lambda: serve(args, environ), args.log_level)
