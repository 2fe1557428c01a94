"""The ``oip`` backend: any Open Inference Protocol gRPC server (KServe, MLServer,
Triton, NIM) as one endpoint of a model's pool.

What differs from a mesh replica is all here, in the adapter:
* names: the mesh's model and variant map onto the server's model name and
  version (``backend.model_name``, ``backend.versions``), and back on the answer;
* what leaves the mesh: no ``cmesh-*`` parameter and no mesh-internal token goes
  to the server (the trust layer has masked the inputs before the core calls us);
  the backend's own credential travels in its header, with TLS when configured;
* calls: unary ``ModelInfer``; a streamed call uses ``ModelStreamInfer`` when the
  server has it (``backend.stream``), else it is answered in one piece.

Errors are ``BackendError`` like a replica's, so breakers, retries and outlier
ejection treat both alike.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from cmesh import wire
from cmesh.config import BackendConfig, MeshConfig
from cmesh.tls import open_channel
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from router.backends.base import CHANNEL_OPTIONS, BackendError
from router.backends.mesh import error_from_rpc, error_from_stream

MESH_PREFIX = "cmesh-"


def backend_specs(config: MeshConfig) -> dict[str, BackendConfig]:
    """Every model's oip backend (its own, or its spill-over pool's)."""
    specs = {}
    for name, model in config.models.items():
        spec = model.backend if model.backend.kind == "oip" else model.backend.spill_over
        if spec is not None:
            specs[name] = spec
    return specs


class OipBackend:
    external = True

    def __init__(self, address: str, model: str, spec: BackendConfig, secret: str | None = None) -> None:
        self.address = address
        self.model = model
        self.spec = spec
        self.server_model = spec.model_name or model
        self.channel = open_channel(address, spec.tls, CHANNEL_OPTIONS)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        cred = spec.credential
        self._metadata = ((cred.header, f"{cred.prefix}{secret}"),) if cred is not None and secret else None

    # -- names ---------------------------------------------------------------------

    def _out(self, request: pb.ModelInferRequest) -> tuple[str, str, dict]:
        """Rewrite ``request`` in place for the server; what ``_back`` restores."""
        ours = (request.model_name, request.model_version)
        request.model_name = self.server_model
        request.model_version = self.spec.versions.get(ours[1], "")
        params = request.parameters
        kept = {}
        for key in [k for k in params if k.startswith(MESH_PREFIX)]:
            kept[key] = pb.InferParameter()
            kept[key].CopyFrom(params[key])
            del params[key]
        return ours[0], ours[1], kept

    @staticmethod
    def _back(request: pb.ModelInferRequest, saved: tuple[str, str, dict]) -> None:
        request.model_name, request.model_version = saved[0], saved[1]
        for key, value in saved[2].items():
            request.parameters[key].CopyFrom(value)

    @staticmethod
    def _answer(response: pb.ModelInferResponse, saved: tuple[str, str, dict]) -> pb.ModelInferResponse:
        response.model_name, response.model_version = saved[0], saved[1]
        return response

    def _error(self, exc: grpc.aio.AioRpcError, started: bool) -> BackendError:
        err = error_from_rpc(exc, started)
        err.message = f"oip backend {self.address}: {err.message}"
        if err.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            # The server refused *our* credential, not the caller's: a gateway fault
            # (like Envoy's 503 for an upstream that rejects it), judged by the breaker.
            err.message = f"{err.message} (the backend refused the mesh's credential: {err.code.name})"
            err.code, err.reason, err.retryable = grpc.StatusCode.UNAVAILABLE, "backend_credential_refused", False
        if err.code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL) and not started:
            err.retryable = False
        return err

    # -- Backend -------------------------------------------------------------------

    async def call(self, request: pb.ModelInferRequest, timeout: float) -> pb.ModelInferResponse:
        saved = self._out(request)
        try:
            response = await self.stub.ModelInfer(request, timeout=timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, started=False) from None
        finally:
            self._back(request, saved)
        return wire.strip_stream_markers(self._answer(response, saved))

    async def stream(self, request: pb.ModelInferRequest, timeout: float) -> AsyncIterator[pb.ModelInferResponse]:
        if not self.spec.stream:
            # Answered in one piece, marked as the stream's last like any streamed answer.
            response = await self.call(request, timeout)
            response.parameters[wire.P_FINAL].bool_param = True
            yield response
            return
        saved = self._out(request)
        started = False
        call = self.stub.ModelStreamInfer(iter([request]), timeout=timeout, metadata=self._metadata)
        try:
            async for response in call:
                if response.error_message:
                    raise error_from_stream(response, started)
                if not started:
                    self._back(request, saved)       # serialised by now
                started = True
                final = wire.is_final(response.infer_response)
                yield self._answer(response.infer_response, saved)
                if final:
                    return
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, started) from None
        finally:
            call.cancel()
            if not started:
                self._back(request, saved)

    async def ready(self, model: str, version: str = "", timeout: float = 5.0) -> bool:
        try:
            answer = await self.stub.ModelReady(
                pb.ModelReadyRequest(name=self.server_model, version=self.spec.versions.get(version, "")),
                timeout=timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError:
            return False
        return answer.ready

    async def metadata(self, model: str, version: str = "", timeout: float = 10.0) -> pb.ModelMetadataResponse:
        try:
            answer = await self.stub.ModelMetadata(
                pb.ModelMetadataRequest(name=self.server_model, version=self.spec.versions.get(version, "")),
                timeout=timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, started=False) from None
        answer.name = model
        return answer

    async def close(self, graceful: bool = False) -> None:
        await self.channel.close(grace=30.0 if graceful else None)


async def resolve(address: str) -> list[str]:
    """Every address of ``host:port`` (a Kubernetes Service: one ClusterIP, or each
    pod of a headless one), sorted; [] when the name does not resolve."""
    host, _, port = address.rpartition(":")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=0, proto=6)
    except OSError:
        return []
    found = set()
    for family, *_rest, sockaddr in infos:
        ip = sockaddr[0]
        found.add(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
    return sorted(found)
