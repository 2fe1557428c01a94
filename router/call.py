"""The router core's typed call, and what a call cost.

A front door (the OIP servicer, a pipeline node) decodes and validates a request
once into a ``Call``: who, which model, which ids, which latency class, until
when. The core's stages read these fields and never parse the request's
parameters again; the request proto carries the tensors (and the caller's own
parameters) to the backend.

``Accounting`` is the answer's side of the same rule: the final response's
parameters are decoded once, by the core, into what metering and pipeline traces
both read.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from cmesh import wire
from cmesh.tensors import decode_parameters
from protos import inference_pb2 as pb
from router.auth import Principal


@dataclass(slots=True)
class Call:
    principal: Principal
    model: str
    request: pb.ModelInferRequest      # tensors and the caller's own parameters
    deadline: float                    # monotonic seconds
    request_id: str = ""               # "" = the core assigns one
    latency_class: str = ""            # "" = the model's default
    pipeline: str = ""
    session: str = ""
    version: str = ""                  # a pinned variant; "" = the A/B draw
    streaming: bool = False
    accounting: "Accounting" = field(default_factory=lambda: Accounting())


def _count(value, kind=int):
    """A replica-reported amount as a finite, non-negative number (0 when absent or bad)."""
    try:
        number = kind(value or 0)
    except (TypeError, ValueError):
        return kind(0)
    return number if number >= 0 and number == number and number != float("inf") else kind(0)


@dataclass(slots=True)
class Accounting:
    """What one call cost and where its time went. The router's own queue timings
    come from the lease; the rest from the final response, decoded once."""

    variant: str = ""
    router_queue_ms: float = 0.0       # queued in the router before dispatch
    cold_start_ms: float = 0.0         # of which: held for a first replica
    attempts: int = 0
    queue_ms: float = 0.0              # queued in the replica
    compute_ms: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    external: bool = False

    def read_answer(self, response: pb.ModelInferResponse) -> None:
        params = decode_parameters(response.parameters)
        self.queue_ms = wire.ms(params.get(wire.P_QUEUE_MS))
        self.compute_ms = wire.ms(params.get(wire.P_COMPUTE_MS))
        self.input_tokens = _count(params.get(wire.P_INPUT_TOKENS))
        self.output_tokens = _count(params.get(wire.P_OUTPUT_TOKENS))
        self.external = params.get(wire.P_EXTERNAL) is True
