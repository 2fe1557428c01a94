"""Fakes for the router core's unit tests (DESIGN.md §7: replicas behind an abstract
handle, the clock injected; no sockets, no patching).

``FakeBackends`` is a ``router.backends.Backends``: every endpoint gets a
``FakeBackend`` whose answers a test scripts (``script``: a queue of outcomes,
then ``default``). ``FakeClock`` is the core's monotonic clock, moved by hand.
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import grpc

from cmesh import wire
from cmesh.config import MeshConfig, parse_config
from protos import inference_pb2 as pb
from router.backends.base import BackendError


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def fail(code: str = "UNAVAILABLE", *, started: bool = False, **kw: Any) -> BackendError:
    return BackendError(getattr(grpc.StatusCode, code), f"fake {code}", started=started, **kw)


class FakeBackend:
    """One endpoint. Outcomes: ``"ok"``, a ``BackendError`` (raised), an
    ``asyncio.Event`` (wait for it, then answer), or ``("stream", n, error)``:
    n responses, then the error (None: the last response is final)."""

    def __init__(self, address: str, external: bool = False, compute_ms: float | None = 1.0) -> None:
        self.address = address
        self.external = external
        self.compute_ms = compute_ms
        self.script: deque = deque()
        self.default: Any = "ok"
        self.calls: list[pb.ModelInferRequest] = []
        self.closed = False

    def _answer(self, request: pb.ModelInferRequest, final: bool | None = None) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                         id=request.id)
        if self.compute_ms is not None:
            wire.set_ms(response.parameters, wire.P_COMPUTE_MS, self.compute_ms)
        if final is not None:
            response.parameters[wire.P_FINAL].bool_param = final
        response.outputs.add(name="served_by", datatype="BYTES", shape=[1])
        response.raw_output_contents.append(len(self.address).to_bytes(4, "little") + self.address.encode())
        return response

    async def _outcome(self) -> Any:
        outcome = self.script.popleft() if self.script else self.default
        if isinstance(outcome, asyncio.Event):
            await outcome.wait()
            return "ok"
        if isinstance(outcome, BackendError):         # a fresh error per call: the core annotates it
            return BackendError(outcome.code, outcome.message, reason=outcome.reason,
                                started=outcome.started, retryable=outcome.retryable)
        return outcome

    async def call(self, request: pb.ModelInferRequest, timeout: float) -> pb.ModelInferResponse:
        copy = pb.ModelInferRequest()
        copy.CopyFrom(request)
        self.calls.append(copy)
        outcome = await self._outcome()
        if isinstance(outcome, BackendError):
            raise outcome
        return self._answer(request)

    async def stream(self, request: pb.ModelInferRequest, timeout: float):
        self.calls.append(request)
        outcome = await self._outcome()
        if isinstance(outcome, BackendError):
            raise outcome
        count, error = (outcome[1], outcome[2]) if isinstance(outcome, tuple) else (2, None)
        for i in range(count):
            yield self._answer(request, final=error is None and i == count - 1)
        if error is not None:
            error.started = count > 0
            raise error

    async def ready(self, model: str, version: str = "", timeout: float = 5.0) -> bool:
        return True

    async def metadata(self, model: str, version: str = "", timeout: float = 10.0):
        return pb.ModelMetadataResponse(name=model, platform="fake")

    async def close(self, graceful: bool = False) -> None:
        self.closed = True


class FakeBackends:
    def __init__(self, external: set[str] | None = None, compute_ms: float | None = 1.0) -> None:
        self.by_address: dict[str, FakeBackend] = {}
        self.external = external or set()
        self.compute_ms = compute_ms

    def __getitem__(self, address: str) -> FakeBackend:
        if address not in self.by_address:
            ext = address in self.external
            self.by_address[address] = FakeBackend(address, ext, None if ext else self.compute_ms)
        return self.by_address[address]

    def get(self, model: str, replica) -> FakeBackend:
        return self[replica.address]

    def apply(self, config) -> None:
        self.applied = config

    def retire(self, live: set[str]) -> None:
        for address in [a for a in self.by_address if a not in live]:
            self.by_address.pop(address).closed = True

    async def close(self) -> None:
        for backend in self.by_address.values():
            backend.closed = True


def served_by(response: pb.ModelInferResponse) -> str:
    return response.raw_output_contents[0][4:].decode()


def core_config(models: dict, **router: Any) -> MeshConfig:
    return parse_config({"store": "/nonexistent", "models": models, "router": router})
