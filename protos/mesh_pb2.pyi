from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

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
    __slots__ = ("model", "variant", "queue_depth", "in_flight", "arrivals", "ready", "load_seconds")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    ARRIVALS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    variant: str
    queue_depth: int
    in_flight: int
    arrivals: int
    ready: bool
    load_seconds: float
    def __init__(self, model: _Optional[str] = ..., variant: _Optional[str] = ..., queue_depth: _Optional[int] = ..., in_flight: _Optional[int] = ..., arrivals: _Optional[int] = ..., ready: _Optional[bool] = ..., load_seconds: _Optional[float] = ...) -> None: ...
