"""The control loop: metrics window + pure policy -> desired replicas -> provider.

Every tick, each model is decided on its own load (never on aggregate traffic,
unless the ``uniform`` baseline strategy is configured for a comparison),
with scheduled minimums and warm-up floors; new replicas are placed on devices
first-fit decreasing; the endpoint table follows every replica state change.
A Warm request (a router holding requests for a model at zero) starts the
model - and, coordinated, every other model of its pipelines - at once.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone

from autoscaler.backlog import observe_service
from autoscaler.generations import repool, to_retire
from autoscaler.graph_ahead import ahead_concurrency, model_edges, window_rates
from autoscaler.metrics import AutoscalerMetrics
from autoscaler.placement import Placed, place, replica_request, utilisation
from autoscaler.policy import PolicyState, ScalingContext, decide, uniform_contexts
from autoscaler.prewarm import warm_plan
from autoscaler.providers.base import LIVE, Provider
from autoscaler.schedule import scheduled_minimums
from autoscaler.table import TablePublisher
from autoscaler.trend import expected_cold_start
from autoscaler.window import MetricsWindow
from cmesh.config import MeshConfig
from protos import mesh_pb2

log = logging.getLogger(__name__)
POOLS = ("dedicated", "serverless")


class Controller:
    def __init__(self, config: MeshConfig, provider: Provider, *, metrics: AutoscalerMetrics | None = None,
                 coordinated: bool | None = None, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.config = config
        self.provider = provider
        self.metrics = metrics or AutoscalerMetrics()
        self.coordinated = config.autoscaler.coordinated_prewarm if coordinated is None else coordinated
        self._now = clock
        self._wall = wall
        # A router's last report counts until it is as old as "stale": then it stops
        # adding to the model's load, as a router that went away should.
        self.window = MetricsWindow(config.autoscaler.stable_window_s,
                                    source_ttl_s=config.autoscaler.stale_after_s)
        self._manifest_mb: dict[str, int] = {}
        self.publisher = TablePublisher(first_version=int(wall() * 1000))
        self._states: dict[str, PolicyState] = {m: PolicyState() for m in config.scaled_models}
        self._decisions: dict[str, object] = {}
        self._warmed_at: dict[str, float] = {}
        self._graph_edges = model_edges(config)     # graph-ahead: upstream models per model
        self._cold_start: dict[str, float] = {}    # last known cold start per model (trend-ahead's lead)
        self._service: dict[str, float] = {}       # time in system while keeping up (autoscaler.backlog)
        self._refused: dict[str, str] = {}
        self._lock = asyncio.Lock()
        self._publish_pending = False
        self._replica_s: dict[str, float] = {}   # ready replica-seconds per model (capacity paid for)
        self._accounted_at = clock()
        self.config_id = ""                        # the applied config in force (autoscaler.live)
        provider.subscribe(self._on_replicas_changed)

    # -- inputs ---------------------------------------------------------------------

    def on_report(self, report: mesh_pb2.LoadReport) -> None:
        now = self._now()
        for load in report.models:
            if not load.variant and load.model in self.config.scaled_models:   # variant entries: canary figures
                self.window.add(load.model, now, concurrency=load.queue_depth + load.in_flight,
                                arrivals=load.arrivals, held=int(report.held.get(load.model, 0)),
                                source=report.source)

    async def warm(self, *, model: str = "", pipeline: str = "", reason: str = "") -> list[str]:
        """Start replicas now for the model (and, coordinated, the rest of its
        pipelines) or for every model of a pipeline."""
        if pipeline:
            models = [m for m, _ in warm_plan(self.config, None, pipeline=pipeline).order]
        elif self.coordinated:
            models = [model] + [m for m, _ in warm_plan(self.config, model).order if m != model]
        else:
            models = [model]
        now = self._now()
        for m in models:
            self._warmed_at[m] = now
            self.metrics.warms.labels(m, reason or "requested").inc()
        await self.tick(only=models)
        return models

    async def apply(self, config: MeshConfig, config_path: str = "", config_id: str = "") -> None:
        """Follow an applied config without a restart. Scaling state of unchanged
        models carries over (window, policy state, replicas); a mode switch moves
        running replicas between pools; a changed replica template (a version
        switch) is rolled out by ``_roll`` as the new generation becomes ready;
        removed models drain. The next tick (the leader's) acts on it."""
        async with self._lock:
            old, self.config = self.config, config
            if hasattr(self.provider, "apply"):
                self.provider.apply(config, config_path, config_id)
            self._states = {m: self._states.get(m) or PolicyState() for m in config.scaled_models}
            self._decisions = {m: d for m, d in self._decisions.items() if m in config.scaled_models}
            self._graph_edges = model_edges(config)
            self.config_id = config_id
            for model in list(self._manifest_mb):
                before, after = old.models.get(model), config.models.get(model)
                if after is None or before is None or before.variant_sources() != after.variant_sources():
                    self._manifest_mb.pop(model)
            for model, spec in config.scaled_models.items():
                before = old.models.get(model)
                if before is not None and before.deployment.mode != spec.deployment.mode \
                        and hasattr(self.provider, "repool"):
                    mine = [r for r in self.provider.replicas() if r.model == model]
                    log.info("%s: mode %s -> %s, re-pooling %d replica(s)", model, before.deployment.mode,
                             spec.deployment.mode, len(mine))
                    self.provider.repool(repool(mine, spec.deployment))

    # -- the loop -------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - one bad tick must not stop scaling
                log.exception("autoscaler tick failed")
            await asyncio.sleep(self.config.autoscaler.tick_s)    # the control period

    async def tick(self, only: list[str] | None = None) -> None:
        async with self._lock:
            now = self._now()
            wall = datetime.fromtimestamp(self._wall(), tz=timezone.utc)
            scheduled = scheduled_minimums(self.config, wall, self.config.autoscaler.schedule_lead_s)
            ahead = self._ahead(now)
            contexts = {m: self._context(m, now, scheduled.get(m, 0), ahead) for m in self.config.scaled_models}
            if self.config.autoscaler.strategy == "uniform":
                contexts = uniform_contexts(contexts, self._uniform_target())
            for model in [m for m in (only or self.config.models) if m in contexts]:
                await self._decide(model, contexts[model], now)
                self._roll(model)
            if only is None:
                for model in {r.model for r in self.provider.replicas()} - set(self.config.scaled_models):
                    await self._remove(model)
            self._observe()

    def _context(self, model: str, now: float, scheduled_min: int,
                 ahead: dict[str, float] | None = None) -> ScalingContext:
        # The one context builder (the tests' and the simulator's too).
        current = self._current(model)
        ctx = ScalingContext.from_window(
            self.window, model, self.config.models[model].deployment, self.config.autoscaler, now,
            current_serverless=sum(1 for r in current if r.pool == "serverless"),
            current_dedicated=sum(1 for r in current if r.pool == "dedicated"), scheduled_min=scheduled_min,
            touched_at=self._warmed_at.get(model),
            ahead_concurrency=(ahead or {}).get(model),
            ready_serverless=sum(1 for r in current if r.pool == "serverless" and r.state == "ready"),
            lead_s=self._lead(model), service_s=self._service.get(model))
        # Backlog-aware scaling's service time, measured only while the pool keeps
        # up: every replica ready, nothing held (autoscaler.backlog).
        keeping_up = bool(current) and ctx.held == 0 and all(r.state == "ready" for r in current)
        service = observe_service(self._service.get(model), load=ctx.panic_concurrency, rate=ctx.arrival_rate,
                                  keeping_up=keeping_up)
        if service is not None:
            self._service[model] = service
        return ctx

    def _lead(self, model: str) -> float | None:
        """The model's expected cold start, from its replicas' own measurements;
        remembered, so a model back from zero still has one."""
        lead = expected_cold_start((r.cold_start_s for r in self.provider.replicas() if r.model == model),
                                   self._cold_start.get(model))
        if lead is not None:
            self._cold_start[model] = lead
        return lead

    def _ahead(self, now: float) -> dict[str, float] | None:
        """Graph-ahead predictions (``autoscaler.graph_ahead``), or None when off."""
        if not self.config.autoscaler.graph_ahead:
            return None
        cfg = self.config.autoscaler
        return ahead_concurrency(self._graph_edges, window_rates(self.window, self.config.models, now,
                                                                 cfg.panic_window_s, cfg.stable_window_s))

    def _uniform_target(self) -> float:
        cfg = self.config.autoscaler
        return cfg.uniform_target_concurrency or sum(
            m.deployment.target_concurrency for m in self.config.scaled_models.values())

    async def _decide(self, model: str, ctx: ScalingContext, now: float) -> None:
        cfg = self.config.autoscaler
        current = {"dedicated": ctx.current_dedicated, "serverless": ctx.current_serverless}
        decision, self._states[model] = decide(ctx, cfg, self._states[model])
        self._decisions[model] = decision
        desired = {"dedicated": decision.desired_dedicated, "serverless": decision.desired_serverless}
        if not decision.valid:
            desired = dict(current)            # no valid decision: keep what runs
        # (The warm-up floor is the policy's: ctx.warmed_s, autoscaler.policy.decide.)
        for pool in POOLS:
            self.metrics.desired.labels(model, pool).set(desired[pool])
            if desired[pool] != current[pool]:
                devices = self._placement(model, desired[pool] - current[pool])
                target = current[pool] + len(devices) if desired[pool] > current[pool] else desired[pool]
                if target != current[pool]:
                    direction = "up" if target > current[pool] else "down"
                    self.metrics.scale_events.labels(model, pool, direction).inc()
                    log.info("%s %s pool: %d -> %d (%s)", model, pool, current[pool], target, decision.reason)
                    await self.provider.scale(model, pool, target, devices)

    def _roll(self, model: str) -> None:
        """Drain outgoing replicas (an older generation) one per ready successor, so
        a version switch never lowers the capacity that serves (autoscaler.generations)."""
        outgoing = self.provider.outgoing(model) if hasattr(self.provider, "outgoing") else []
        if not outgoing:
            return
        decision = self._decisions.get(model)
        for pool in POOLS:
            old = [r for r in outgoing if r.pool == pool]
            if not old:
                continue
            valid = decision is not None and decision.valid
            desired = getattr(decision, f"desired_{pool}") if valid else self._count(model, pool) + len(old)
            ready = sum(1 for r in self._current(model) if r.pool == pool and r.state == "ready")
            for handle in to_retire(old, ready, desired):
                log.info("%s: retiring %s of an older generation (%d successor(s) ready)", model, handle.id, ready)
                self.provider.retire(handle)

    async def _remove(self, model: str) -> None:
        """A model the applied config no longer has: its replicas drain."""
        if hasattr(self.provider, "outgoing"):
            for handle in self.provider.outgoing(model):
                self.provider.retire(handle)
            return
        for pool in POOLS:
            await self.provider.scale(model, pool, 0, [])

    def _current(self, model: str) -> list:
        """The model's live replicas of its current generation."""
        out = {r.id for r in self.provider.outgoing(model)} if hasattr(self.provider, "outgoing") else set()
        return [r for r in self.provider.replicas()
                if r.model == model and r.state in LIVE and r.id not in out]

    def _count(self, model: str, pool: str) -> int:
        return sum(1 for r in self._current(model) if r.pool == pool)

    def _placement(self, model: str, adding: int) -> list[str]:
        """Devices for new replicas (first-fit decreasing); an empty slot list when
        scaling down. Replicas that fit nowhere are refused with the reason kept."""
        if adding <= 0:
            return []
        existing = [Placed(model=r.model, device=r.device, memory_mb=r.memory_mb or self._memory_mb(r.model))
                    for r in self.provider.replicas() if r.device]
        request = replica_request(model, self.config.models[model], self._manifest_memory(model))
        result = place([request] * adding, self.config.devices, existing)
        if result.refused:
            self._refused[model] = result.refused[0][1]
            log.warning("cannot place %d replica(s) of %s: %s", len(result.refused), model, result.refused[0][1])
        else:
            self._refused.pop(model, None)
        return [device for _, device in result.placed]

    def _memory_mb(self, model: str) -> int:
        return self.config.models[model].resources.memory_mb or self._manifest_memory(model) or 256

    def _manifest_memory(self, model: str) -> int | None:
        """The store manifest's memory estimate (the config may override it)."""
        if model not in self._manifest_mb:
            from cmesh.store import ModelStore

            try:
                source = next(iter(self.config.models[model].variant_sources().values())).source
                self._manifest_mb[model] = ModelStore(self.config.store).open(source).manifest.memory_mb
            except Exception:  # noqa: BLE001 - the store may be unreachable from here (Kubernetes)
                self._manifest_mb[model] = 0
        return self._manifest_mb[model] or None

    # -- outputs --------------------------------------------------------------------

    def _on_replicas_changed(self) -> None:
        if not self._publish_pending:
            self._publish_pending = True
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self._publish()))

    async def _publish(self) -> None:
        self._publish_pending = False
        caps = {m: c.deployment.max_inflight_per_replica for m, c in self.config.models.items()}
        await self.publisher.publish(self.provider.replicas(), caps)
        self._observe()

    def _observe(self) -> None:
        replicas = self.provider.replicas()
        now = self._now()
        elapsed, self._accounted_at = now - self._accounted_at, now
        for r in replicas:
            if r.state == "ready":
                self._replica_s[r.model] = self._replica_s.get(r.model, 0.0) + elapsed
        self.metrics.observe_replicas(replicas)
        for usage in self._utilisation(replicas):
            self.metrics.device_used.labels(usage.name).set(usage.used_mb)

    def _utilisation(self, replicas):
        placed = [Placed(model=r.model, device=r.device, memory_mb=r.memory_mb or self._memory_mb(r.model))
                  for r in replicas if r.device]
        return utilisation(self.config.devices, placed)

    def status(self, leader: bool = True) -> mesh_pb2.StatusResponse:
        now = self._now()
        replicas = self.provider.replicas()
        resp = mesh_pb2.StatusResponse(leader=leader, endpoint_version=self.publisher.version,
                                       config_id=self.config_id)
        for model, spec in self.config.scaled_models.items():
            decision = self._decisions.get(model)
            latest = self.window.latest(model) or {}
            ms = resp.models.add(model=model, mode=spec.deployment.mode,
                                 queue_depth=int(latest.get("concurrency", 0)), held=self.window.held(model, now),
                                 panic=bool(getattr(decision, "panic", False)),
                                 last_decision=self._refused.get(model) or getattr(decision, "reason", ""))
            ms.replica_seconds = self._replica_s.get(model, 0.0)
            ms.desired_dedicated = getattr(decision, "desired_dedicated", 0)
            ms.desired_serverless = getattr(decision, "desired_serverless", 0)
            outgoing = {r.id for r in self.provider.outgoing(model)} if hasattr(self.provider, "outgoing") \
                else set()
            for r in sorted((r for r in replicas if r.model == model), key=lambda h: h.id):
                ms.replicas.add(id=r.id, address=r.address or "", pool=r.pool, state=r.state, device=r.device,
                                cold_start_s=r.cold_start_s or 0.0, age_s=now - r.started_at,
                                generation=r.generation, config_id=r.config_id, outgoing=r.id in outgoing)
                if r.cold_start_s:
                    ms.last_cold_start_s = r.cold_start_s
        for usage in self._utilisation(replicas):
            resp.devices.add(name=usage.name, kind=usage.kind, memory_mb=usage.memory_mb, used_mb=usage.used_mb,
                             replicas=usage.replicas)
        return resp
