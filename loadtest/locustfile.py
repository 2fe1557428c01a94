"""Locust users for the mesh's front door: OIP ModelInfer and cmesh.v1.Pipelines.Run over gRPC.

    locust -f loadtest/locustfile.py --headless -u 50 -r 10 -t 30s --host 127.0.0.1:8000

``--host`` is the router's gRPC address, ``HOST:PORT`` (an ``http://`` or ``grpc://``
prefix is accepted and dropped). Every call is reported to locust as a request of
type ``grpc`` named after the method and its model or pipeline; a failed call
(any gRPC status but OK) is a locust failure, never a crashed user.

Two user classes, by latency class:

* ``InteractiveUser`` (weight 4): the support-agent pipeline (task weight 5) and
  the embedder and intent-classifier models called directly (3 each).
* ``BatchUser`` (weight 1): the code-review pipeline (1), in the batch class.

Every call carries ``authorization: Bearer $CMESH_API_KEY`` (default: the key
``make up`` prints for tenant acme), ``cmesh-latency-class`` and
``cmesh-pipeline-id`` (the pipeline's name for Run; ``$CMESH_LOCUST_PIPELINE_ID``,
default ``locust``, for direct model calls, so load-test traffic is metered apart);
ModelInfer requests also carry both in their ``parameters``.

Environment (read when locust loads this file):

* ``CMESH_API_KEY``            API key (default ``cmesh-keys-acme-demo``)
* ``CMESH_LOCUST_MODELS``      direct model tasks, comma-separated
                               ``NAME[:INPUT][@CLASS][=WEIGHT]``; INPUT is the BYTES
                               input (default ``text``), CLASS ``interactive``
                               (default) or ``batch``, WEIGHT the task weight
                               (default 1); default ``embedder=3,intent-classifier=3``;
                               empty for none
* ``CMESH_LOCUST_PIPELINES``   pipeline tasks, ``NAME[@CLASS][=WEIGHT]``, default
                               ``support-agent=5,code-review@batch=1``; empty for none
* ``CMESH_LOCUST_PIPELINE_ID`` pipeline id for direct model calls (default ``locust``)
* ``CMESH_LOCUST_TIMEOUT_S``   per-call gRPC deadline (default 30: the first call to a
                               model at zero replicas waits for its cold start)
* ``CMESH_LOCUST_WAIT_S``      ``MIN,MAX`` think time between a user's calls (default ``0.1,1.0``)

Blocking gRPC is made cooperative with gevent (``grpc.experimental.gevent``), so
one locust process runs many users, each with its own channel. This file uses our
generated stubs only: tritonclient registers the same protobuf package and cannot
share a process with them.
"""
from __future__ import annotations

import os
import random
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from locust import User, between  # imported first: locust monkey-patches the stdlib for gevent

import grpc  # noqa: E402
import grpc.experimental.gevent as grpc_gevent  # noqa: E402

# gRPC's own I/O must cooperate with gevent, or one blocking call stalls every
# user in the process. Must run before any gRPC object is created.
grpc_gevent.init_gevent()

try:
    from protos import inference_pb2, inference_pb2_grpc, mesh_pb2, mesh_pb2_grpc
except ImportError:  # run from a checkout that is not installed: the repo root holds protos/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from protos import inference_pb2, inference_pb2_grpc, mesh_pb2, mesh_pb2_grpc

DEFAULT_API_KEY = "cmesh-keys-acme-demo"
DEFAULT_MODELS = "embedder=3,intent-classifier=3"
DEFAULT_PIPELINES = "support-agent=5,code-review@batch=1"
LATENCY_CLASSES = ("interactive", "batch")
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 2**20),
                   ("grpc.max_send_message_length", 64 * 2**20)]

SUPPORT_QUESTIONS = [
    "How do I reset my password?",
    "Where is my order 1042?",
    "Can I change the shipping address of order 1007?",
    "My invoice shows the wrong amount, what should I do?",
    "How long does a refund take?",
    "The app crashes when I upload a photo.",
    "Do you ship to Canada?",
    "I want to cancel my subscription.",
]
CODE_SNIPPETS = [
    "def add(a, b):\n    return a - b\n",
    "for i in range(len(items)):\n    print(items[i])\n",
    "def read(path):\n    f = open(path)\n    return f.read()\n",
    "if x == None:\n    x = []\nx.append(1)\n",
]


class GrpcCallError(Exception):
    """A call that ended with a gRPC status other than OK: ``CODE: details``."""


@dataclass(frozen=True)
class Target:
    """One weighted task: a model called directly, or a pipeline run."""

    kind: str            # "model" or "pipeline"
    name: str
    latency_class: str
    weight: int
    input_name: str = "text"


def parse_targets(spec: str, kind: str) -> list[Target]:
    """``NAME[:INPUT][@CLASS][=WEIGHT]`` items, comma-separated (INPUT for models only)."""
    targets = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        head, _, weight = item.partition("=")
        head, _, latency_class = head.partition("@")
        name, _, input_name = head.partition(":")
        latency_class = latency_class.strip() or "interactive"
        if latency_class not in LATENCY_CLASSES:
            raise ValueError(f"{item!r}: latency class must be 'interactive' or 'batch'")
        if input_name and kind != "model":
            raise ValueError(f"{item!r}: only models take an input name")
        try:
            count = int(weight) if weight.strip() else 1
        except ValueError:
            raise ValueError(f"{item!r}: weight must be an integer") from None
        if not name.strip() or count < 1:
            raise ValueError(f"{item!r}: needs a name and a weight >= 1")
        targets.append(Target(kind, name.strip(), latency_class, count, input_name.strip() or "text"))
    return targets


def grpc_target(host: str | None) -> str:
    """``--host`` as a gRPC target: ``HOST:PORT``, with any URL scheme and path dropped."""
    if not host:
        raise ValueError("no host: pass --host HOST:PORT (the router's gRPC address)")
    address = host.strip()
    if "://" in address:
        address = address.split("://", 1)[1]
    return address.split("/", 1)[0]


def _env_targets() -> list[Target]:
    return (parse_targets(os.environ.get("CMESH_LOCUST_MODELS", DEFAULT_MODELS), "model")
            + parse_targets(os.environ.get("CMESH_LOCUST_PIPELINES", DEFAULT_PIPELINES), "pipeline"))


def _wait_bounds() -> tuple[float, float]:
    low, _, high = os.environ.get("CMESH_LOCUST_WAIT_S", "0.1,1.0").partition(",")
    return float(low), float(high or low)


TARGETS = _env_targets()
API_KEY = os.environ.get("CMESH_API_KEY") or DEFAULT_API_KEY
MODEL_PIPELINE_ID = os.environ.get("CMESH_LOCUST_PIPELINE_ID", "locust")
TIMEOUT_S = float(os.environ.get("CMESH_LOCUST_TIMEOUT_S", "30"))


def model_request(target: Target, text: str) -> inference_pb2.ModelInferRequest:
    request = inference_pb2.ModelInferRequest(model_name=target.name)
    tensor = request.inputs.add(name=target.input_name, datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(text.encode("utf-8"))
    request.parameters["cmesh-pipeline-id"].string_param = MODEL_PIPELINE_ID
    request.parameters["cmesh-latency-class"].string_param = target.latency_class
    return request


class MeshUser(User):
    """One blocking gRPC channel per user; its tasks come from ``TARGETS``."""

    abstract = True
    host = "127.0.0.1:8000"              # `make up`'s router; --host overrides
    wait_time = between(*_wait_bounds())
    latency_class = "interactive"

    def on_start(self) -> None:
        self.channel = grpc.insecure_channel(grpc_target(self.host), options=CHANNEL_OPTIONS)
        self.infer_stub = inference_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.pipelines_stub = mesh_pb2_grpc.PipelinesStub(self.channel)
        self.session = uuid.uuid4().hex[:12]   # sticky A/B key for this user's pipeline runs

    def on_stop(self) -> None:
        channel = getattr(self, "channel", None)
        if channel is not None:
            channel.close()

    def metadata(self, target: Target, pipeline_id: str) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {API_KEY}"),
                ("cmesh-latency-class", target.latency_class),
                ("cmesh-pipeline-id", pipeline_id)]

    def _call(self, name: str, call: Callable[[], object]) -> None:
        """Run one call and report it; every failure is a locust failure, never an escape."""
        started = time.perf_counter()
        length, error = 0, None
        try:
            response = call()
            length = response.ByteSize()
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            error = GrpcCallError(f"{getattr(code, 'name', code)}: {details}")
        except Exception as exc:  # noqa: BLE001 - a load generator reports, it does not crash
            error = exc
        self.environment.events.request.fire(
            request_type="grpc", name=name, response_time=(time.perf_counter() - started) * 1000.0,
            response_length=length, exception=error, context={"latency_class": self.latency_class})

    def infer(self, target: Target) -> None:
        request = model_request(target, random.choice(SUPPORT_QUESTIONS))
        self._call(f"ModelInfer {target.name}", lambda: self.infer_stub.ModelInfer(
            request, timeout=TIMEOUT_S, metadata=self.metadata(target, MODEL_PIPELINE_ID)))

    def run_pipeline(self, target: Target) -> None:
        texts = CODE_SNIPPETS if target.latency_class == "batch" else SUPPORT_QUESTIONS
        request = mesh_pb2.RunRequest(pipeline=target.name, inputs={"text": random.choice(texts)},
                                      session=self.session)
        self._call(f"Pipelines.Run {target.name}", lambda: self.pipelines_stub.Run(
            request, timeout=TIMEOUT_S, metadata=self.metadata(target, target.name)))


def _task(target: Target) -> Callable[[MeshUser], None]:
    def task(user: MeshUser) -> None:
        (user.infer if target.kind == "model" else user.run_pipeline)(target)

    task.__name__ = f"{target.kind}_{target.name}".replace("-", "_")
    return task


def _tasks(latency_class: str) -> dict[Callable[[MeshUser], None], int]:
    return {_task(t): t.weight for t in TARGETS if t.latency_class == latency_class}


class InteractiveUser(MeshUser):
    """Interactive traffic: pipeline runs and direct model calls in the interactive class."""

    latency_class = "interactive"
    weight = 4
    tasks = _tasks("interactive")
    abstract = not tasks                 # no interactive targets configured: no such users


class BatchUser(MeshUser):
    """Batch traffic (e.g. code review): queued behind interactive work in the router."""

    latency_class = "batch"
    weight = 1
    tasks = _tasks("batch")
    abstract = not tasks
