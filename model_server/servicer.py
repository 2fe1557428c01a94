"""Thin OIP servicer: protobuf <-> data plane objects, errors -> status codes."""
from __future__ import annotations

from collections.abc import AsyncIterator

from cmesh import tensors, wire
from cmesh.rpc import guarded, serve_stream
from model_server.dataplane import DataPlane, InferRequest, InferResponse
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc

SERVER_NAME = "cmesh-model-server"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["model_repository", "model_repository(unload_dependents)", "parameters",
              "binary_tensor_data", "streaming"]


def to_domain(request: pb.ModelInferRequest, limits=tensors.DEFAULT_LIMITS) -> InferRequest:
    return InferRequest(model=request.model_name, version=request.model_version, id=request.id,
                        inputs=tensors.decode_inputs(request, limits),
                        parameters=tensors.decode_parameters(request.parameters),
                        requested_outputs=[o.name for o in request.outputs])


def to_proto(response: InferResponse) -> pb.ModelInferResponse:
    out = pb.ModelInferResponse(model_name=response.model, model_version=response.version,
                                id=response.id)
    tensors.encode_outputs(out, response.outputs)
    for key, value in response.parameters.items():
        tensors.set_param(out.parameters, key, value)
    return out


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane, health) -> None:
        self.dataplane = dataplane
        self.health = health          # object with .ready (bool)
        self.limits = dataplane.repository.config.server.limits

    @property
    def repository(self):
        return self.dataplane.repository

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.health.ready)

    @guarded
    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.health.ready and
                                     self.repository.is_ready(request.name, request.version))

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION,
                                         extensions=EXTENSIONS)

    @guarded
    async def ModelMetadata(self, request, context):
        variant = self.repository.variant(request.name, request.version)
        entry = next(e for e in self.repository.entries() if e.name == request.name)
        m = variant.manifest
        resp = pb.ModelMetadataResponse(name=request.name, versions=sorted(entry.variants),
                                        platform=m.platform)
        for spec in m.inputs:
            resp.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        for spec in m.outputs:
            resp.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        return resp

    @guarded
    async def ModelInfer(self, request, context):
        return to_proto(await self.dataplane.infer(to_domain(request, self.limits)))

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests on one stream run concurrently; responses carry the request id."""

        async def answer(request: pb.ModelInferRequest, emit) -> None:
            domain = to_domain(request, self.limits)
            if domain.parameters.get(wire.P_COLLECT):
                # A unary caller multiplexed onto this stream (the router's data
                # path): one whole answer, even from a generative model.
                response = to_proto(await self.dataplane.infer(domain))
                tensors.set_param(response.parameters, wire.P_FINAL, True)
                await emit(pb.ModelStreamInferResponse(infer_response=response))
                return
            async for piece in self.dataplane.stream(domain):
                await emit(pb.ModelStreamInferResponse(infer_response=to_proto(piece)))

        async for response in serve_stream(request_iterator, answer):
            yield response

    @guarded
    async def RepositoryIndex(self, request, context):
        resp = pb.RepositoryIndexResponse()
        loaded = {e.name: e for e in self.repository.entries()}
        for name in sorted(self.repository.config.models):
            entry = loaded.get(name)
            state = entry.state if entry else "UNAVAILABLE"
            if request.ready and state != "READY":
                continue
            resp.models.add(name=name, version=entry.default_variant if entry else "",
                            state=state, reason=entry.reason if entry else "not loaded")
        return resp

    @guarded
    async def RepositoryModelLoad(self, request, context):
        await self.repository.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @guarded
    async def RepositoryModelUnload(self, request, context):
        await self.repository.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()
