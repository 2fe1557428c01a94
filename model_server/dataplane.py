"""The model server's data plane, independent of gRPC: validate, queue, answer.

The servicer converts protobuf to ``InferRequest`` and back; everything that
decides anything lives here or below.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cmesh import wire
from cmesh.errors import DeadlineExceeded, InvalidInput, MeshError, quote
from cmesh.wire import (P_BATCH_SIZE, P_CLASS, P_COMPUTE_MS, P_FINAL, P_INPUT_TOKENS, P_OUTPUT_TOKENS, P_SOURCE,
                        P_PIPELINE, P_QUEUE_MS, P_TIMEOUT_MS, ms_text)
from model_server.engines.base import InferItem
from model_server.repository import ModelRepository, Variant
from model_server.runner import Completion



def _count_caller(metrics, parameters: dict[str, Any]) -> None:
    """Which pipeline and latency class each request came with (routers stamp both)."""
    metrics.caller(str(parameters.get(P_PIPELINE) or ""), str(parameters.get(P_CLASS) or ""))


def _remaining_s(parameters: dict[str, Any]) -> float | None:
    """The deadline a router propagated as remaining time (gRPC's own deadline only
    covers a whole stream, not one request multiplexed onto it)."""
    return wire.timeout_s(parameters.get(P_TIMEOUT_MS))


@dataclass
class InferRequest:
    model: str
    version: str = ""
    id: str = ""
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    requested_outputs: list[str] = field(default_factory=list)


@dataclass
class InferResponse:
    model: str
    version: str
    id: str
    outputs: dict[str, np.ndarray]
    parameters: dict[str, Any]


class DataPlane:
    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository

    def _prepare(self, variant: Variant, request: InferRequest) -> InferItem:
        known = {o.name for o in variant.manifest.outputs}
        for name in request.requested_outputs:
            if name not in known:
                raise InvalidInput(name, f"unknown output; model {quote(request.model)} has {sorted(known)}")
        item = variant.engine.prepare(request.inputs, request.parameters)
        item.requested_outputs = tuple(request.requested_outputs)
        return item

    async def infer(self, request: InferRequest) -> InferResponse:
        variant = self.repository.variant(request.model, request.version)
        metrics = variant.metrics
        _count_caller(metrics, request.parameters)
        try:
            item = self._prepare(variant, request)
            timeout = _remaining_s(request.parameters)
            if timeout is None:
                completion = await variant.runner.infer(item)
            else:
                try:
                    async with asyncio.timeout(timeout):
                        completion = await variant.runner.infer(item)
                except TimeoutError:
                    raise DeadlineExceeded(f"deadline passed before {variant.model!r} answered",
                                           component=variant.model) from None
            if completion.result.error is not None:
                raise completion.result.error
        except MeshError as exc:
            metrics.count(exc.code.name)
            raise
        metrics.count("OK")
        metrics.tokens(item.input_tokens, completion.result.output_tokens)
        return self._response(request, variant, item, completion.result.outputs, completion)

    async def stream(self, request: InferRequest) -> AsyncIterator[InferResponse]:
        """Pieces of one answer; the last carries the accounting parameters."""
        variant = self.repository.variant(request.model, request.version)
        metrics = variant.metrics
        _count_caller(metrics, request.parameters)
        try:
            item = self._prepare(variant, request)
        except MeshError as exc:
            metrics.count(exc.code.name)
            raise
        chunks = variant.runner.stream(item)
        try:
            async for chunk in chunks:
                if chunk.final and chunk.completion is not None:
                    if chunk.completion.result.error is not None:
                        raise chunk.completion.result.error
                    metrics.count("OK")
                    metrics.tokens(item.input_tokens, chunk.completion.result.output_tokens)
                yield self._response(request, variant, item, chunk.outputs,
                                     chunk.completion if chunk.final else None, final=chunk.final)
        except MeshError as exc:
            metrics.count(exc.code.name)
            raise
        finally:
            await chunks.aclose()

    @staticmethod
    def _response(request: InferRequest, variant: Variant, item: InferItem,
                  outputs: dict[str, np.ndarray], completion: Completion | None,
                  final: bool | None = None) -> InferResponse:
        if item.requested_outputs:
            outputs = {k: v for k, v in outputs.items() if k in item.requested_outputs}
        params: dict[str, Any] = {}
        if completion is not None:
            # Timings as text: readable by any OIP client (cmesh.wire).
            params[P_COMPUTE_MS] = ms_text(completion.compute_s * 1000.0)
            params[P_QUEUE_MS] = ms_text(completion.queue_s * 1000.0)
            params[P_BATCH_SIZE] = max(completion.batch_sizes, default=0)
            params[P_INPUT_TOKENS] = item.input_tokens
            params[P_OUTPUT_TOKENS] = completion.result.output_tokens
            params[P_SOURCE] = variant.source      # which version answered (rollouts check it)
        if final is not None:
            params[P_FINAL] = final
        return InferResponse(model=variant.model, version=variant.name, id=request.id,
                             outputs=outputs, parameters=params)
