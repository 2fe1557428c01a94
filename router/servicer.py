"""Thin OIP servicer of the router: who is calling and with what options, then
the core; errors map to statuses in one place (cmesh.rpc.guarded)."""
from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping

import grpc

from cmesh.config import MeshConfig
from cmesh import wire
from cmesh.errors import MeshError, NotFound, PermissionDenied, Unavailable, abort_with, quote
from cmesh.rpc import guarded, serve_stream
from cmesh.tensors import decode_parameters
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from router.auth import Authenticator, Gate, Principal
from router.call import Call
from router.core import RouterCore

log = logging.getLogger(__name__)

SERVER_NAME = "cmesh-router"
EXTENSIONS = ["parameters", "binary_tensor_data", "streaming"]


def answer_margin_s(remaining: float) -> float:
    """Time kept back from the caller's deadline, so that our own error - which
    names the model or node that ran out of time - reaches the caller before its
    deadline fires with a bare DEADLINE_EXCEEDED."""
    return min(0.025, 0.1 * remaining)


def metadata_of(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


class FrontDoor:
    """Decodes and validates a call once: who is calling (authentication, the
    tenant's rate limit and model rights), the ids, latency class, session and
    deadline, into the typed ``Call`` the core runs. Nothing downstream parses the
    request's parameters again."""

    def __init__(self, config: MeshConfig, auth: Authenticator, gate: Gate,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.auth = auth
        self.gate = gate
        self._now = clock

    def apply(self, config: MeshConfig, auth: Authenticator) -> None:
        """An applied config: new keys and rights; tenants' rate-limit tokens carry over."""
        self.config, self.auth = config, auth
        self.gate.apply(config, self._now())

    def principal(self, context: grpc.aio.ServicerContext) -> Principal:
        return self.auth.authenticate(metadata_of(context).get("authorization"))

    def call(self, context: grpc.aio.ServicerContext, request: pb.ModelInferRequest,
             principal: Principal | None = None) -> Call:
        return self.call_of(metadata_of(context), context.time_remaining(), request, principal)

    def call_of(self, md: Mapping[str, str], time_remaining: float | None, request: pb.ModelInferRequest,
                principal: Principal | None = None) -> Call:
        """Any transport's call: ``md`` its metadata (lower-case keys, the ``cmesh-*``
        names), ``time_remaining`` the caller's deadline (None: the default)."""
        principal = principal or self.auth.authenticate(md.get("authorization"))
        now = self._now()
        self.gate.admit(principal, request.model_name, now, claimed_tenant=md.get(wire.M_TENANT, ""))
        require_public(self.config, request.model_name)
        params = decode_parameters(request.parameters)
        if time_remaining is None or time_remaining > 1e9:      # no deadline set by the caller
            remaining = self.config.router.default_timeout_s
        else:
            remaining = time_remaining - answer_margin_s(time_remaining)
        asked = wire.timeout_s(params.get(wire.P_TIMEOUT_MS))
        if asked is not None:
            remaining = min(remaining, asked)
        limit = self.config.server.limits.max_id_chars

        def pick(key: str) -> str:
            # Metadata wins over the parameter of the same name.
            return wire.text(key, md.get(key) or params.get(key), limit)

        return Call(principal=principal, model=request.model_name, request=request, deadline=now + remaining,
                    request_id=pick(wire.P_REQUEST_ID), latency_class=wire.latency_class(pick(wire.P_CLASS)),
                    pipeline=pick(wire.P_PIPELINE), session=pick(wire.P_SESSION),
                    version=request.model_version)


def require_public(config: MeshConfig, model: str) -> None:
    """Models marked ``internal`` answer only as pipeline nodes, never a direct call."""
    cfg = config.models.get(model)
    if cfg is not None and cfg.internal:
        raise PermissionDenied(f"model {quote(model)} is internal: it is reachable only as a pipeline node",
                               component=model)


class RouterServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, core: RouterCore, door: FrontDoor, health, describe) -> None:
        self.core = core
        self.door = door
        self.health = health          # .ready
        self.describe = describe      # async (model, version) -> ModelMetadataResponse

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.health.ready)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version="0.1.0", extensions=EXTENSIONS)

    @guarded
    async def ModelReady(self, request, context):
        self.door.principal(context)
        require_public(self.core.config, request.name)
        # A mesh model with no replica is still servable (the router holds the call
        # and the autoscaler warms it); an external one asks its endpoints.
        return pb.ModelReadyResponse(ready=self.health.ready and await self.core.ready(request.name,
                                                                                      request.version))

    @guarded
    async def ModelMetadata(self, request, context):
        self.door.principal(context)
        if request.name not in self.core.config.models:
            raise NotFound(f"unknown model {quote(request.name)}", component=request.name)
        require_public(self.core.config, request.name)
        return await self.describe(request.name, request.version)

    @guarded
    async def ModelInfer(self, request, context):
        return await self.core.infer(self.door.call(context, request))

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        try:
            principal = self.door.principal(context)
        except MeshError as exc:
            await abort_with(context, exc)
            return

        async def answer(request: pb.ModelInferRequest, emit) -> None:
            async for response in self.core.stream(self.door.call(context, request, principal)):
                await emit(pb.ModelStreamInferResponse(infer_response=response))

        async for response in serve_stream(request_iterator, answer, what="routed stream request"):
            yield response


class Describer:
    """ModelMetadata through the router: asked of a ready endpoint through its
    backend; with none (scaled to zero), answered from the model store's manifest
    when the router can read it."""

    def __init__(self, core: RouterCore, manifests) -> None:
        self.core = core
        self.manifests = manifests      # router.manifests.ManifestCache, shared with pipelines

    async def __call__(self, model: str, version: str) -> pb.ModelMetadataResponse:
        cfg = self.core.config.models[model]
        answer = await self.core.describe(model, version)
        if answer is not None:
            return answer
        if cfg.external:
            raise Unavailable(f"no endpoint of external backend {model!r} answered ModelMetadata",
                              component=model)
        variants = cfg.variant_sources()
        variant = version or cfg.default_variant()
        if variant not in variants:
            raise NotFound(f"model {model!r} has no version {variant!r}", component=model)
        try:
            manifest = await self.manifests.get(model, variant)
        except Exception as exc:  # noqa: BLE001 - store unreachable from here
            raise Unavailable(f"no replica of {model!r} to describe it and the store is unreadable: {exc}",
                              component=model) from None
        resp = pb.ModelMetadataResponse(name=model, versions=sorted(variants), platform=manifest.platform)
        for spec in manifest.inputs:
            resp.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        for spec in manifest.outputs:
            resp.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        return resp
