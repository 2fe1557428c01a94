"""The ``mesh.yaml`` schema (DESIGN.md §3): one validated config class per part.

Built once at each entry point (``load_config``) and passed down; nothing reads
the environment or the file at import. Errors name the path and the rule, e.g.
``models.embedder.batching.max_batch_size: must be >= 1``.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cmesh.config_backend import BackendConfig, BackendKind, CredentialConfig, TLSConfig  # noqa: F401 (re-exported)
from cmesh.validation import Strict, load_yaml, read_text, validate_mapping

LatencyClass = Literal["interactive", "batch"]
NAME_RE = r"^[a-z0-9][a-z0-9_.-]*$"
DEFAULT_VARIANT = "default"


class BatchingConfig(Strict):
    """Dynamic batching of one model (overrides the manifest's defaults)."""

    max_batch_size: int | None = Field(None, ge=1, le=4096,
                                       description="most rows in one engine call")
    max_queue_delay_ms: float | None = Field(None, ge=0, le=10_000,
                                             description="longest a request waits for batch-mates")
    max_queue_size: int = Field(2048, ge=1, description="waiting requests before RESOURCE_EXHAUSTED")
    seq_buckets: list[int] = Field(default_factory=lambda: [16, 32, 64, 128, 256, 512],
                                   description="sequence-length bucket bounds for text models")

    @field_validator("seq_buckets")
    @classmethod
    def _ascending(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v) or v != sorted(set(v)):
            raise ValueError("must be strictly ascending positive integers")
        return v


class DeploymentConfig(Strict):
    """How the autoscaler runs a model's replicas."""

    mode: Literal["dedicated", "serverless", "auto"] = "serverless"
    min_replicas: int = Field(0, ge=0, description="provisioned serverless replicas")
    max_replicas: int = Field(4, ge=1)
    dedicated_replicas: int = Field(0, ge=0, description="fixed-size dedicated pool")
    capacity_threshold: float = Field(0.8, gt=0, le=1,
                                      description="dedicated load fraction before spill-over")
    target_concurrency: float = Field(8, gt=0, description="in-flight requests per replica to aim for")
    max_inflight_per_replica: int = Field(32, ge=1, description="router's cap per replica")
    idle_timeout_s: float = Field(300, ge=0, description="no traffic this long -> scale to zero")

    @model_validator(mode="after")
    def _pools(self) -> "DeploymentConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas: {self.min_replicas} exceeds max_replicas {self.max_replicas}")
        if self.mode in ("dedicated", "auto") and self.dedicated_replicas < 1:
            raise ValueError(f"dedicated_replicas: mode {self.mode!r} needs at least 1")
        if self.mode == "serverless" and self.dedicated_replicas:
            raise ValueError("dedicated_replicas: mode 'serverless' has no dedicated pool")
        return self


class ResourcesConfig(Strict):
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$")
    memory_mb: int | None = Field(None, ge=1, description="overrides the manifest's estimate")
    torch_threads: int | None = Field(None, ge=1, le=256)


class PriceConfig(Strict):
    """What a model's use costs (``cmesh.cost``). Tokens: ``per_1k_tokens`` prices
    both directions, the simple case; a per-direction price replaces it for that
    direction (providers price output above input)."""

    replica_second: float = Field(0.0, ge=0, description="per second of compute (or external wall time)")
    per_1k_tokens: float = Field(0.0, ge=0, description="per 1000 tokens, input and output alike")
    per_1k_input_tokens: float | None = Field(None, ge=0, description="per 1000 input (prompt) tokens")
    per_1k_output_tokens: float | None = Field(None, ge=0, description="per 1000 output (completion) tokens")

    def token_prices(self) -> tuple[float, float]:
        """(input, output) price per 1000 tokens."""
        base = self.per_1k_tokens
        return (base if self.per_1k_input_tokens is None else self.per_1k_input_tokens,
                base if self.per_1k_output_tokens is None else self.per_1k_output_tokens)


class VariantConfig(Strict):
    source: str = Field(min_length=1)
    weight: float = Field(1.0, ge=0)
    options: dict[str, Any] = Field(default_factory=dict)


class RolloutConfig(Strict):
    """A canary of one variant, moved through traffic steps by the autoscaler, which
    compares it with the baseline (every other variant) over each step and rolls it
    back by itself on a breach (``autoscaler.canary``)."""

    canary: str = Field(min_length=1, description="the variant being rolled out")
    steps: list[float] = Field(default_factory=lambda: [5.0, 25.0, 50.0, 100.0], min_length=1,
                               description="canary traffic in percent, ascending, each in (0, 100]")
    interval_s: float = Field(60.0, gt=0, description="time at each step before moving to the next")
    max_error_rate: float = Field(0.01, ge=0, le=1,
                                  description="canary error rate above the baseline's by more: roll back")
    max_p95_ratio: float = Field(1.5, gt=0, description="canary P95 over the baseline's above this: roll back")
    min_requests: int = Field(20, ge=1, description="canary requests in a step before it is judged")

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[float]) -> list[float]:
        if any(not 0 < s <= 100 for s in v):
            raise ValueError("must each be in (0, 100]")
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError("must be strictly ascending")
        return v


class ModelTrustConfig(Strict):
    """What the trust layer does to one model's answers (inputs are always masked)."""

    mask_outputs: bool = Field(False, description="mask e-mails, phones and cards in text outputs")
    redact_fields: list[str] = Field(default_factory=list,
                                     description="JSON text outputs: replace these keys' values")


class ModelConfig(Strict):
    source: str | None = Field(None, min_length=1, description="store://name/version, path or URL")
    variants: dict[str, VariantConfig] | None = None
    rollout: RolloutConfig | None = Field(None, description="a canary of one variant with automatic analysis")
    engine: str | None = Field(None, description="defaults to the manifest's engine")
    latency_class: LatencyClass = "interactive"
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    deployment: DeploymentConfig = Field(default_factory=DeploymentConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    price: PriceConfig = Field(default_factory=PriceConfig)
    options: dict[str, Any] = Field(default_factory=dict, description="engine option overrides")
    tenants: list[str] | None = Field(None, description="tenants allowed to call it; None: every tenant")
    internal: bool = Field(False, description="reachable only as a pipeline node, never by a direct call")
    trust: ModelTrustConfig = Field(default_factory=ModelTrustConfig)
    backend: BackendConfig = Field(default_factory=BackendConfig,
                                   description="mesh (default), oip or openai: see BackendConfig")
    endpoints: list[str] | dict[Literal["dedicated", "serverless"], list[str]] = Field(
        default_factory=list,
        description="static host:port replicas for a router without an autoscaler; a list "
                    "goes to the pool the mode implies, or give {dedicated: [...], serverless: [...]}")

    def static_pools(self) -> dict[str, list[str]]:
        if isinstance(self.endpoints, dict):
            return {pool: list(addrs) for pool, addrs in self.endpoints.items()}
        pool = "serverless" if self.deployment.mode == "serverless" else "dedicated"
        return {pool: list(self.endpoints)} if self.endpoints else {}

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if self.backend.kind != "mesh":
            # The server holds the model: no source, no replicas of ours.
            if self.source is not None or self.endpoints:
                raise ValueError(f"backend: kind {self.backend.kind!r} serves the model itself; "
                                 "give no source or endpoints")
        elif (self.source is None) == (self.variants is None):
            raise ValueError("source: give exactly one of source or variants")
        if self.backend.spill_over is not None and self.deployment.mode != "auto":
            raise ValueError("backend.spill_over: needs deployment.mode 'auto' (dedicated pool, then spill-over)")
        if self.variants is not None:
            if not self.variants:
                raise ValueError("variants: must not be empty")
            for name in self.variants:
                if not re.match(NAME_RE, name):
                    raise ValueError(f"variants.{name}: must match {NAME_RE}")
            if sum(v.weight for v in self.variants.values()) <= 0:
                raise ValueError("variants: weights must not all be 0")
        if self.rollout is not None:
            if self.variants is None or len(self.variants) < 2:
                raise ValueError("rollout: needs variants: the canary and at least one baseline")
            if self.rollout.canary not in self.variants:
                raise ValueError(f"rollout.canary: unknown variant {self.rollout.canary!r} "
                                 f"(variants: {', '.join(sorted(self.variants))})")
        return self

    @property
    def external(self) -> bool:
        """Served by an external backend only: the autoscaler runs no replica of it."""
        return self.backend.kind != "mesh"

    def variant_sources(self) -> dict[str, VariantConfig]:
        """Every variant by name; a single-source model has one named 'default'."""
        if self.variants is not None:
            return dict(self.variants)
        return {DEFAULT_VARIANT: VariantConfig(source=self.source or "external", weight=1.0)}

    def default_variant(self) -> str:
        variants = self.variant_sources()
        return max(variants, key=lambda k: variants[k].weight)


class NodeConfig(Strict):
    model: str
    input: str | dict[str, str] | None = None
    after: list[str] = Field(default_factory=list)
    when: str | None = None
    optional: bool = False
    timeout_ms: int | None = Field(None, ge=1)
    fallback: str | None = None
    stream: bool = False
    params: dict[str, Any] = Field(default_factory=dict)


class PipelineConfig(Strict):
    latency_class: LatencyClass = "interactive"
    output: str | None = Field(None, description="the node whose output is the answer; default: the last sink")
    nodes: dict[str, NodeConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _graph(self) -> "PipelineConfig":
        for name, node in self.nodes.items():
            for dep in node.after:
                if dep not in self.nodes:
                    raise ValueError(f"nodes.{name}.after: unknown node {dep!r}")
        order = _topological(self.nodes)
        if order is None:
            raise ValueError("nodes: the graph has a cycle")
        if self.output is not None and self.output not in self.nodes:
            raise ValueError(f"output: unknown node {self.output!r}")
        return self


def _topological(nodes: dict[str, NodeConfig]) -> list[str] | None:
    indegree = {n: len(set(c.after)) for n, c in nodes.items()}
    ready = [n for n, d in indegree.items() if d == 0]
    order = []
    while ready:
        n = ready.pop()
        order.append(n)
        for m, c in nodes.items():
            if n in c.after:
                indegree[m] -= 1
                if indegree[m] == 0:
                    ready.append(m)
    return order if len(order) == len(nodes) else None


_CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")


class ScheduleConfig(Strict):
    pipeline: str | None = None
    model: str | None = None
    cron: str
    hours: float = Field(gt=0, le=24 * 7)
    min_replicas: int = Field(1, ge=0)

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        fields = v.split()
        if len(fields) != 5 or not all(_CRON_FIELD.match(f) for f in fields):
            raise ValueError("must be a 5-field cron expression like '0 8 * * 1-5'")
        return v

    @model_validator(mode="after")
    def _target(self) -> "ScheduleConfig":
        if (self.pipeline is None) == (self.model is None):
            raise ValueError("pipeline: give exactly one of pipeline or model")
        return self


class TenantConfig(Strict):
    api_keys_env: str = Field(min_length=1, description="environment variable holding comma-separated keys")
    rate_per_s: float = Field(100, gt=0)
    burst: int | None = Field(None, ge=1)
    admin: bool = False


class InputLimits(Strict):
    """What one request may declare, checked against the bytes present before
    anything is allocated (router and model server share the check)."""

    max_elements: int = Field(2**24, ge=1, description="elements in one tensor")
    max_rank: int = Field(8, ge=1, le=32, description="dimensions of one tensor")
    max_batch: int = Field(65536, ge=1, description="size of a tensor's first dimension")
    max_inputs: int = Field(64, ge=1, description="input tensors in one request")
    max_text_elements: int = Field(16384, ge=1, description="elements of one BYTES tensor (each is "
                                                            "decoded one by one, on the event loop)")
    max_text_bytes: int = Field(2**20, ge=1, description="text the trust layer masks per request; "
                                                             "more is INVALID_ARGUMENT")
    max_id_chars: int = Field(256, ge=8, description="request id, pipeline id, session, tenant")


class ServerConfig(Strict):
    """Limits shared by every gRPC listener."""

    limits: InputLimits = Field(default_factory=InputLimits)

    max_message_bytes: int = Field(4 * 2**20, ge=1024, description="larger messages: RESOURCE_EXHAUSTED, "
                                   "refused by gRPC before any of ours runs (its default too)")
    drain_grace_s: float = Field(30, ge=0, description="SIGTERM: finish in-flight work within this")
    drain_delay_s: float = Field(1.0, ge=0, description="SIGTERM: stay reachable as NOT_SERVING this "
                                                         "long first, so clients notice and stop sending")
    model_control: Literal["none", "explicit"] = Field(
        "none", description="replicas' RepositoryModelLoad/Unload, as Triton's --model-control-mode: "
                            "none (the default) refuses them with FAILED_PRECONDITION; explicit allows them")


class BreakerConfig(Strict):
    """Circuit breaker per component (model and variant)."""

    failure_threshold: int = Field(5, ge=1, description="consecutive failures that open it")
    cool_down_s: float = Field(5.0, gt=0, description="open this long before a probe")
    half_open_probes: int = Field(1, ge=1, description="requests let through while half-open")


class OutlierConfig(Strict):
    """Ejection of a single misbehaving replica (Envoy-style outlier detection)."""

    consecutive_failures: int = Field(3, ge=1)
    base_ejection_s: float = Field(5.0, gt=0, description="doubles with each repeat ejection")
    max_ejection_fraction: float = Field(0.5, gt=0, le=1, description="never eject more of a pool")


class RetryConfig(Strict):
    max_attempts: int = Field(3, ge=1, description="first try included")
    budget_ratio: float = Field(0.2, ge=0, le=1, description="retries per request, at most")
    min_retries_per_s: float = Field(3.0, ge=0, description="always allowed, for low traffic")
    backoff_ms: float = Field(5.0, ge=0)


class SecurityConfig(Strict):
    server_tls: TLSConfig | None = Field(None, description="every listening port")
    client_tls: TLSConfig | None = Field(None, description="every channel to another service")
    admin_keys_env: str | None = Field(None, description="env var with comma-separated admin keys")
    internal_token_env: str | None = Field(
        None, min_length=1, description="env var holding the mesh-internal token: replicas and the autoscaler "
                                        "accept only callers that send it (unless server_tls verifies "
                                        "client certificates); None and no mutual TLS: internal ports are open")
    audit_log: str | None = Field(None, description="JSONL file for trust-layer audit records")
    mask_workers: int = Field(1, ge=1, le=64, description="processes that mask large texts off the "
                                                          "router's event loop")


class RouterConfig(Strict):
    autoscaler: str | None = Field(None, description="host:port of the autoscaler; None: static endpoints")
    data_path: Literal["stream", "unary"] = Field("stream", description="how requests reach replicas")
    max_queue_per_model: int = Field(2048, ge=1, description="waiting requests before shedding")
    hold_timeout_s: float = Field(30.0, gt=0, description="longest a request waits for a first replica")
    max_held_per_model: int = Field(1024, ge=1, description="bounded buffer while a model has no replica")
    default_timeout_s: float = Field(60.0, gt=0, description="deadline for calls that set none")
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    outlier: OutlierConfig = Field(default_factory=OutlierConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)


class DeviceConfig(Strict):
    """A place replicas are packed onto (for this machine: CPU slots with memory)."""

    name: str = Field(pattern=NAME_RE)
    kind: Literal["cpu", "cuda"] = "cpu"
    memory_mb: int = Field(ge=1)
    max_replicas: int | None = Field(None, ge=1, description="replica slots on it; None: memory decides")


class KubernetesConfig(Strict):
    namespace: str = "cmesh"
    image: str = "cmesh:latest"
    deployment_prefix: str = "cmesh-model-"
    port: int = Field(8001, ge=1, le=65535)


class ReadinessProbeConfig(Strict):
    """The autoscaler's own probe of every ready replica: OIP ModelReady for each model
    and variant it hosts; a replica failing it this many times in a row is replaced."""

    period_s: float = Field(2.0, gt=0, description="time between probes of one replica")
    timeout_s: float = Field(1.0, gt=0, description="a probe taking longer fails")
    failure_threshold: int = Field(3, ge=1, description="consecutive failed probes that replace a replica")


class AutoscalerConfig(Strict):
    """The control loop and its policy windows (Knative-style)."""

    provider: Literal["local", "kubernetes"] = "local"
    listen: str = Field("127.0.0.1:8500", description="host:port of the Autoscaler gRPC service")
    tick_s: float = Field(1.0, gt=0, description="how often decisions are made")
    stable_window_s: float = Field(60.0, gt=0, description="averaging window for normal scaling")
    panic_window_s: float = Field(6.0, gt=0, description="short window that reacts to bursts")
    panic_threshold: float = Field(2.0, gt=1, description="panic when the short window wants this x current")
    max_scale_up_rate: float = Field(10.0, gt=1, description="at most this x current replicas per decision")
    scale_down_delay_s: float = Field(0.0, ge=0, description="keep the max of decisions over this long")
    max_scale_down_rate: float | None = Field(
        None, gt=1, description="step-wise scale-down: at most to current / this per step, and one step per "
                                "stable window (each step judged on a full window at the new size); "
                                "None: straight to what the load wants")
    stale_after_s: float = Field(5.0, gt=0, description="no decision when the newest metrics are older")
    schedule_lead_s: float = Field(120.0, ge=0, description="raise scheduled minimums this early")
    strategy: Literal["per-model", "uniform"] = Field(
        "per-model", description="per-model: each model on its own load; uniform: a baseline for "
                                 "experiments that scales every model together on the mesh's aggregate load")
    uniform_target_concurrency: float | None = Field(
        None, gt=0, description="uniform: aggregate in-flight requests per replica of every model "
                                "(default: the sum of the models' target_concurrency)")
    coordinated_prewarm: bool = Field(True, description="a cold touch of one model of a pipeline warms the "
                                                        "rest of the pipeline in parallel")
    graph_ahead: bool = Field(False, description="scale a pipeline's downstream models on their upstream "
                                                 "models' arrivals times the measured branch ratios, "
                                                 "before their own queues show the load")
    trend_ahead: bool = Field(False, description="scale up on a rising load's trend: the arrival rate's "
                                                 "least-squares slope, projected one cold start ahead "
                                                 "(autoscaler.trend); never scales down")
    trend_lead_factor: float = Field(1.0, gt=0, le=4, description="trend_ahead: project this x the "
                                                                  "model's measured cold start ahead")
    trend_min_z: float = Field(3.0, ge=0, description="trend_ahead: a slope counts only this many "
                                                      "standard errors above zero (noise does not scale)")
    backlog_drain_s: float | None = Field(None, gt=0, description="backlog-aware scale-up: size a queue "
                                          "to be drained this many seconds after the replicas asked "
                                          "for serve, not as concurrency (autoscaler.backlog); "
                                          "None: off")
    drain_grace_s: float = Field(20.0, ge=0, description="scale-down: in-flight work may take this long")
    ready_timeout_s: float = Field(180.0, gt=0, description="a replica not ready by then is replaced")
    lease_ttl_s: float = Field(5.0, gt=0, description="leader lease in Redis; a standby takes over after it")
    readiness_probe: ReadinessProbeConfig = Field(default_factory=ReadinessProbeConfig)
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig)

    @model_validator(mode="after")
    def _windows(self) -> "AutoscalerConfig":
        if self.panic_window_s > self.stable_window_s:
            raise ValueError("panic_window_s: must not exceed stable_window_s")
        return self


class ObservabilityConfig(Strict):
    """Export of pipeline traces as OpenTelemetry spans (off unless configured)."""

    tracing: Literal["none", "otlp", "console", "memory"] = Field(
        "none", description="otlp: to otlp_endpoint; console: stdout; memory: kept in-process (tests)")
    otlp_endpoint: str | None = Field(None, description="host:port of an OTLP/gRPC collector")
    service_name: str = "cmesh-router"

    @model_validator(mode="after")
    def _endpoint(self) -> "ObservabilityConfig":
        if self.tracing == "otlp" and not self.otlp_endpoint:
            raise ValueError("otlp_endpoint: tracing 'otlp' needs a collector address")
        return self


class MeshConfig(Strict):
    store: str = Field("./.cmesh/store", description="model store root: path, file://, s3://")
    redis_url: str | None = None
    server: ServerConfig = Field(default_factory=ServerConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    autoscaler: AutoscalerConfig = Field(default_factory=AutoscalerConfig)
    devices: list[DeviceConfig] = Field(default_factory=lambda: [DeviceConfig(name="cpu0", memory_mb=8192)])
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    observability: ObservabilityConfig = Field(default_factory=ObservabilityConfig)
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    pipelines: dict[str, PipelineConfig] = Field(default_factory=dict)
    schedules: list[ScheduleConfig] = Field(default_factory=list)
    tenants: dict[str, TenantConfig] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _references(self) -> "MeshConfig":
        # Every broken reference at once (one line each), so an operator applying a
        # config sees all of them in one refusal.
        problems = [f"models.{name}: name must match {NAME_RE}" for name in self.models
                    if not re.match(NAME_RE, name)]
        for name, model in self.models.items():
            problems += [f"models.{name}.tenants: unknown tenant {tenant!r}"
                         for tenant in model.tenants or [] if tenant not in self.tenants]
        for pname, pipe in self.pipelines.items():
            for nname, node in pipe.nodes.items():
                if node.model not in self.models:
                    problems.append(f"pipelines.{pname}.nodes.{nname}.model: unknown model {node.model!r}")
                if node.fallback is not None and node.fallback not in self.models:
                    problems.append(f"pipelines.{pname}.nodes.{nname}.fallback: "
                                    f"unknown model {node.fallback!r}")
        # Imported here: cmesh.pipeline_check reads this module's types.
        from cmesh.pipeline_check import validate_pipeline

        for pname, pipe in self.pipelines.items():
            problems += validate_pipeline(pname, pipe)
        for i, sched in enumerate(self.schedules):
            if sched.pipeline is not None and sched.pipeline not in self.pipelines:
                problems.append(f"schedules.{i}.pipeline: unknown pipeline {sched.pipeline!r}")
            if sched.model is not None and sched.model not in self.models:
                problems.append(f"schedules.{i}.model: unknown model {sched.model!r}")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def scaled_models(self) -> dict[str, ModelConfig]:
        """The models the autoscaler runs replicas of: all but those served only by an
        external backend (``backend.kind`` other than ``mesh``)."""
        return {name: m for name, m in self.models.items() if not m.external}

    def model(self, name: str) -> ModelConfig:
        from cmesh.errors import NotFound

        try:
            return self.models[name]
        except KeyError:
            raise NotFound(f"unknown model {name!r}", component=name) from None


def parse_config(data: Any, source: str = "mesh.yaml") -> MeshConfig:
    return validate_mapping(MeshConfig, data, source)


def load_config(path: str | Path) -> MeshConfig:
    data = load_yaml(read_text(path), str(path))
    return parse_config(data, source=str(path))


def with_overrides(config: MeshConfig, overrides: Mapping[str, Any], source: str = "command line") -> MeshConfig:
    """A new config with ``section.field`` values replaced (an entry point's flags;
    None leaves a value alone), validated like the file. Configs are never mutated
    after they are built: the original is untouched."""
    if all(value is None for value in overrides.values()):
        return config
    data = config.model_dump(mode="json", exclude_unset=True)
    for path, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return parse_config(data, source)


def redis_url(flag: str | None, config: MeshConfig, environ: Mapping[str, str]) -> str | None:
    """Where shared state lives: the flag, then the config, then ``$REDIS_URL``
    (``environ`` is the entry point's); None: in-process state."""
    return flag or config.redis_url or environ.get("REDIS_URL") or None
