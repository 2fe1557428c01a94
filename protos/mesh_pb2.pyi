from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ComponentError(_message.Message):
    __slots__ = ("component", "pipeline", "reason", "retryable", "retry_after_ms", "field", "node")
    COMPONENT_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    component: str
    pipeline: str
    reason: str
    retryable: bool
    retry_after_ms: int
    field: str
    node: str
    def __init__(self, component: _Optional[str] = ..., pipeline: _Optional[str] = ..., reason: _Optional[str] = ..., retryable: _Optional[bool] = ..., retry_after_ms: _Optional[int] = ..., field: _Optional[str] = ..., node: _Optional[str] = ...) -> None: ...

class ModelLoad(_message.Message):
    __slots__ = ("model", "variant", "queue_depth", "in_flight", "arrivals", "ready", "load_seconds", "answered", "failed", "latency_counts")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    ARRIVALS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    LATENCY_COUNTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    variant: str
    queue_depth: int
    in_flight: int
    arrivals: int
    ready: bool
    load_seconds: float
    answered: int
    failed: int
    latency_counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., variant: _Optional[str] = ..., queue_depth: _Optional[int] = ..., in_flight: _Optional[int] = ..., arrivals: _Optional[int] = ..., ready: _Optional[bool] = ..., load_seconds: _Optional[float] = ..., answered: _Optional[int] = ..., failed: _Optional[int] = ..., latency_counts: _Optional[_Iterable[int]] = ...) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("source", "timestamp_ms", "models", "held")
    class HeldEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    source: str
    timestamp_ms: int
    models: _containers.RepeatedCompositeFieldContainer[ModelLoad]
    held: _containers.ScalarMap[str, int]
    def __init__(self, source: _Optional[str] = ..., timestamp_ms: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelLoad, _Mapping]]] = ..., held: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ReportLoadAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Replica(_message.Message):
    __slots__ = ("id", "address", "pool", "state", "max_inflight", "variants")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MAX_INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    address: str
    pool: str
    state: str
    max_inflight: int
    variants: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., address: _Optional[str] = ..., pool: _Optional[str] = ..., state: _Optional[str] = ..., max_inflight: _Optional[int] = ..., variants: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelEndpoints(_message.Message):
    __slots__ = ("model", "replicas")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    model: str
    replicas: _containers.RepeatedCompositeFieldContainer[Replica]
    def __init__(self, model: _Optional[str] = ..., replicas: _Optional[_Iterable[_Union[Replica, _Mapping]]] = ...) -> None: ...

class EndpointTable(_message.Message):
    __slots__ = ("version", "models", "config")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    version: int
    models: _containers.RepeatedCompositeFieldContainer[ModelEndpoints]
    config: ConfigRecord
    def __init__(self, version: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelEndpoints, _Mapping]]] = ..., config: _Optional[_Union[ConfigRecord, _Mapping]] = ...) -> None: ...

class WatchEndpointsRequest(_message.Message):
    __slots__ = ("router_id", "known_version")
    ROUTER_ID_FIELD_NUMBER: _ClassVar[int]
    KNOWN_VERSION_FIELD_NUMBER: _ClassVar[int]
    router_id: str
    known_version: int
    def __init__(self, router_id: _Optional[str] = ..., known_version: _Optional[int] = ...) -> None: ...

class WarmRequest(_message.Message):
    __slots__ = ("model", "pipeline", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    pipeline: str
    reason: str
    def __init__(self, model: _Optional[str] = ..., pipeline: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class WarmResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, models: _Optional[_Iterable[str]] = ...) -> None: ...

class ConfigRecord(_message.Message):
    __slots__ = ("id", "applied_at", "applied_by", "source", "sha256", "note", "yaml")
    ID_FIELD_NUMBER: _ClassVar[int]
    APPLIED_AT_FIELD_NUMBER: _ClassVar[int]
    APPLIED_BY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    YAML_FIELD_NUMBER: _ClassVar[int]
    id: str
    applied_at: float
    applied_by: str
    source: str
    sha256: str
    note: str
    yaml: str
    def __init__(self, id: _Optional[str] = ..., applied_at: _Optional[float] = ..., applied_by: _Optional[str] = ..., source: _Optional[str] = ..., sha256: _Optional[str] = ..., note: _Optional[str] = ..., yaml: _Optional[str] = ...) -> None: ...

class ConfigChange(_message.Message):
    __slots__ = ("kind", "path", "before", "after")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    kind: str
    path: str
    before: str
    after: str
    def __init__(self, kind: _Optional[str] = ..., path: _Optional[str] = ..., before: _Optional[str] = ..., after: _Optional[str] = ...) -> None: ...

class ApplyConfigRequest(_message.Message):
    __slots__ = ("yaml", "dry_run", "rollback", "applied_by", "source")
    YAML_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    APPLIED_BY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    yaml: str
    dry_run: bool
    rollback: bool
    applied_by: str
    source: str
    def __init__(self, yaml: _Optional[str] = ..., dry_run: _Optional[bool] = ..., rollback: _Optional[bool] = ..., applied_by: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class ApplyConfigResponse(_message.Message):
    __slots__ = ("record", "changes", "applied", "routers", "followed")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    ROUTERS_FIELD_NUMBER: _ClassVar[int]
    FOLLOWED_FIELD_NUMBER: _ClassVar[int]
    record: ConfigRecord
    changes: _containers.RepeatedCompositeFieldContainer[ConfigChange]
    applied: bool
    routers: int
    followed: bool
    def __init__(self, record: _Optional[_Union[ConfigRecord, _Mapping]] = ..., changes: _Optional[_Iterable[_Union[ConfigChange, _Mapping]]] = ..., applied: _Optional[bool] = ..., routers: _Optional[int] = ..., followed: _Optional[bool] = ...) -> None: ...

class ConfigHistoryRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ConfigHistoryResponse(_message.Message):
    __slots__ = ("records", "current_id")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ID_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[ConfigRecord]
    current_id: str
    def __init__(self, records: _Optional[_Iterable[_Union[ConfigRecord, _Mapping]]] = ..., current_id: _Optional[str] = ...) -> None: ...

class RolloutStatusRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class VariantFigures(_message.Message):
    __slots__ = ("variant", "answered", "failed", "error_rate", "p95_ms")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    P95_MS_FIELD_NUMBER: _ClassVar[int]
    variant: str
    answered: int
    failed: int
    error_rate: float
    p95_ms: float
    def __init__(self, variant: _Optional[str] = ..., answered: _Optional[int] = ..., failed: _Optional[int] = ..., error_rate: _Optional[float] = ..., p95_ms: _Optional[float] = ...) -> None: ...

class RolloutState(_message.Message):
    __slots__ = ("model", "canary", "state", "step", "weight", "steps", "step_age_s", "canary_figures", "baseline_figures", "reason", "config_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STEP_AGE_S_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIGURES_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIGURES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CONFIG_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    canary: str
    state: str
    step: int
    weight: float
    steps: _containers.RepeatedScalarFieldContainer[float]
    step_age_s: float
    canary_figures: VariantFigures
    baseline_figures: VariantFigures
    reason: str
    config_id: str
    def __init__(self, model: _Optional[str] = ..., canary: _Optional[str] = ..., state: _Optional[str] = ..., step: _Optional[int] = ..., weight: _Optional[float] = ..., steps: _Optional[_Iterable[float]] = ..., step_age_s: _Optional[float] = ..., canary_figures: _Optional[_Union[VariantFigures, _Mapping]] = ..., baseline_figures: _Optional[_Union[VariantFigures, _Mapping]] = ..., reason: _Optional[str] = ..., config_id: _Optional[str] = ...) -> None: ...

class RolloutStatusResponse(_message.Message):
    __slots__ = ("rollouts",)
    ROLLOUTS_FIELD_NUMBER: _ClassVar[int]
    rollouts: _containers.RepeatedCompositeFieldContainer[RolloutState]
    def __init__(self, rollouts: _Optional[_Iterable[_Union[RolloutState, _Mapping]]] = ...) -> None: ...

class CostReportRequest(_message.Message):
    __slots__ = ("group_by",)
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    group_by: str
    def __init__(self, group_by: _Optional[str] = ...) -> None: ...

class CostRow(_message.Message):
    __slots__ = ("key", "requests", "errors", "input_tokens", "output_tokens", "compute_s", "cost", "external_compute_s")
    KEY_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    key: str
    requests: int
    errors: int
    input_tokens: int
    output_tokens: int
    compute_s: float
    cost: float
    external_compute_s: float
    def __init__(self, key: _Optional[str] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., compute_s: _Optional[float] = ..., cost: _Optional[float] = ..., external_compute_s: _Optional[float] = ...) -> None: ...

class CostReportResponse(_message.Message):
    __slots__ = ("group_by", "rows", "total_cost", "total_compute_s", "incomplete", "spooled_events", "dropped_events")
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_COST_FIELD_NUMBER: _ClassVar[int]
    TOTAL_COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    INCOMPLETE_FIELD_NUMBER: _ClassVar[int]
    SPOOLED_EVENTS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_EVENTS_FIELD_NUMBER: _ClassVar[int]
    group_by: str
    rows: _containers.RepeatedCompositeFieldContainer[CostRow]
    total_cost: float
    total_compute_s: float
    incomplete: bool
    spooled_events: int
    dropped_events: int
    def __init__(self, group_by: _Optional[str] = ..., rows: _Optional[_Iterable[_Union[CostRow, _Mapping]]] = ..., total_cost: _Optional[float] = ..., total_compute_s: _Optional[float] = ..., incomplete: _Optional[bool] = ..., spooled_events: _Optional[int] = ..., dropped_events: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("id", "address", "pool", "state", "device", "cold_start_s", "age_s", "generation", "config_id", "outgoing")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    COLD_START_S_FIELD_NUMBER: _ClassVar[int]
    AGE_S_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_ID_FIELD_NUMBER: _ClassVar[int]
    OUTGOING_FIELD_NUMBER: _ClassVar[int]
    id: str
    address: str
    pool: str
    state: str
    device: str
    cold_start_s: float
    age_s: float
    generation: str
    config_id: str
    outgoing: bool
    def __init__(self, id: _Optional[str] = ..., address: _Optional[str] = ..., pool: _Optional[str] = ..., state: _Optional[str] = ..., device: _Optional[str] = ..., cold_start_s: _Optional[float] = ..., age_s: _Optional[float] = ..., generation: _Optional[str] = ..., config_id: _Optional[str] = ..., outgoing: _Optional[bool] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("model", "mode", "desired_dedicated", "desired_serverless", "replicas", "queue_depth", "in_flight", "held", "panic", "last_decision", "last_cold_start_s", "replica_seconds")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DESIRED_DEDICATED_FIELD_NUMBER: _ClassVar[int]
    DESIRED_SERVERLESS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    PANIC_FIELD_NUMBER: _ClassVar[int]
    LAST_DECISION_FIELD_NUMBER: _ClassVar[int]
    LAST_COLD_START_S_FIELD_NUMBER: _ClassVar[int]
    REPLICA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    mode: str
    desired_dedicated: int
    desired_serverless: int
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    queue_depth: int
    in_flight: int
    held: int
    panic: bool
    last_decision: str
    last_cold_start_s: float
    replica_seconds: float
    def __init__(self, model: _Optional[str] = ..., mode: _Optional[str] = ..., desired_dedicated: _Optional[int] = ..., desired_serverless: _Optional[int] = ..., replicas: _Optional[_Iterable[_Union[ReplicaStatus, _Mapping]]] = ..., queue_depth: _Optional[int] = ..., in_flight: _Optional[int] = ..., held: _Optional[int] = ..., panic: _Optional[bool] = ..., last_decision: _Optional[str] = ..., last_cold_start_s: _Optional[float] = ..., replica_seconds: _Optional[float] = ...) -> None: ...

class DeviceStatus(_message.Message):
    __slots__ = ("name", "kind", "memory_mb", "used_mb", "replicas")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    USED_MB_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    memory_mb: int
    used_mb: int
    replicas: int
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., memory_mb: _Optional[int] = ..., used_mb: _Optional[int] = ..., replicas: _Optional[int] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("leader", "endpoint_version", "models", "devices", "config_id")
    LEADER_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    CONFIG_ID_FIELD_NUMBER: _ClassVar[int]
    leader: bool
    endpoint_version: int
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    devices: _containers.RepeatedCompositeFieldContainer[DeviceStatus]
    config_id: str
    def __init__(self, leader: _Optional[bool] = ..., endpoint_version: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ..., devices: _Optional[_Iterable[_Union[DeviceStatus, _Mapping]]] = ..., config_id: _Optional[str] = ...) -> None: ...

class RunRequest(_message.Message):
    __slots__ = ("pipeline", "inputs", "request_id", "session")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    pipeline: str
    inputs: _containers.ScalarMap[str, str]
    request_id: str
    session: str
    def __init__(self, pipeline: _Optional[str] = ..., inputs: _Optional[_Mapping[str, str]] = ..., request_id: _Optional[str] = ..., session: _Optional[str] = ...) -> None: ...

class NodeTrace(_message.Message):
    __slots__ = ("node", "model", "variant", "status", "start_ms", "end_ms", "queue_ms", "cold_start_ms", "compute_ms", "network_ms", "critical", "error", "input_tokens", "output_tokens", "cost", "model_used")
    NODE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    START_MS_FIELD_NUMBER: _ClassVar[int]
    END_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COLD_START_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    NETWORK_MS_FIELD_NUMBER: _ClassVar[int]
    CRITICAL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    MODEL_USED_FIELD_NUMBER: _ClassVar[int]
    node: str
    model: str
    variant: str
    status: str
    start_ms: float
    end_ms: float
    queue_ms: float
    cold_start_ms: float
    compute_ms: float
    network_ms: float
    critical: bool
    error: str
    input_tokens: int
    output_tokens: int
    cost: float
    model_used: str
    def __init__(self, node: _Optional[str] = ..., model: _Optional[str] = ..., variant: _Optional[str] = ..., status: _Optional[str] = ..., start_ms: _Optional[float] = ..., end_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., cold_start_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., network_ms: _Optional[float] = ..., critical: _Optional[bool] = ..., error: _Optional[str] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., cost: _Optional[float] = ..., model_used: _Optional[str] = ...) -> None: ...

class Trace(_message.Message):
    __slots__ = ("request_id", "pipeline", "total_ms", "nodes", "critical_path")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    CRITICAL_PATH_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    pipeline: str
    total_ms: float
    nodes: _containers.RepeatedCompositeFieldContainer[NodeTrace]
    critical_path: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., pipeline: _Optional[str] = ..., total_ms: _Optional[float] = ..., nodes: _Optional[_Iterable[_Union[NodeTrace, _Mapping]]] = ..., critical_path: _Optional[_Iterable[str]] = ...) -> None: ...

class RunResponse(_message.Message):
    __slots__ = ("pipeline", "answer", "outputs_json", "trace", "cost", "degraded")
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_JSON_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    pipeline: str
    answer: str
    outputs_json: str
    trace: Trace
    cost: float
    degraded: bool
    def __init__(self, pipeline: _Optional[str] = ..., answer: _Optional[str] = ..., outputs_json: _Optional[str] = ..., trace: _Optional[_Union[Trace, _Mapping]] = ..., cost: _Optional[float] = ..., degraded: _Optional[bool] = ...) -> None: ...

class NodeStarted(_message.Message):
    __slots__ = ("node", "model", "at_ms")
    NODE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    node: str
    model: str
    at_ms: float
    def __init__(self, node: _Optional[str] = ..., model: _Optional[str] = ..., at_ms: _Optional[float] = ...) -> None: ...

class RunEvent(_message.Message):
    __slots__ = ("node_started", "node_finished", "token", "final")
    NODE_STARTED_FIELD_NUMBER: _ClassVar[int]
    NODE_FINISHED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    node_started: NodeStarted
    node_finished: NodeTrace
    token: str
    final: RunResponse
    def __init__(self, node_started: _Optional[_Union[NodeStarted, _Mapping]] = ..., node_finished: _Optional[_Union[NodeTrace, _Mapping]] = ..., token: _Optional[str] = ..., final: _Optional[_Union[RunResponse, _Mapping]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ("pipeline",)
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    pipeline: str
    def __init__(self, pipeline: _Optional[str] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node", "model", "depends_on", "when", "optional", "fallback", "timeout_ms", "stream", "level")
    NODE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEPENDS_ON_FIELD_NUMBER: _ClassVar[int]
    WHEN_FIELD_NUMBER: _ClassVar[int]
    OPTIONAL_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    node: str
    model: str
    depends_on: _containers.RepeatedScalarFieldContainer[str]
    when: str
    optional: bool
    fallback: str
    timeout_ms: int
    stream: bool
    level: int
    def __init__(self, node: _Optional[str] = ..., model: _Optional[str] = ..., depends_on: _Optional[_Iterable[str]] = ..., when: _Optional[str] = ..., optional: _Optional[bool] = ..., fallback: _Optional[str] = ..., timeout_ms: _Optional[int] = ..., stream: _Optional[bool] = ..., level: _Optional[int] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("pipeline", "latency_class", "output", "nodes", "drawing")
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_CLASS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    DRAWING_FIELD_NUMBER: _ClassVar[int]
    pipeline: str
    latency_class: str
    output: str
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    drawing: str
    def __init__(self, pipeline: _Optional[str] = ..., latency_class: _Optional[str] = ..., output: _Optional[str] = ..., nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ..., drawing: _Optional[str] = ...) -> None: ...
