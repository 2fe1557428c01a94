"""Client SDK: a small Open Inference Protocol client over our generated stubs.

tritonclient works against every cmesh service too, but it registers the same
``inference`` protobuf package as these stubs, so the two cannot share one
process; this client is what cmesh's own tools, benchmarks and tests use.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cmesh import tensors
from cmesh.config import TLSConfig
from cmesh.tls import open_channel, open_sync_channel
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc

DEFAULT_OPTIONS = [("grpc.max_receive_message_length", 64 * 2**20),
                   ("grpc.max_send_message_length", 64 * 2**20)]


@dataclass
class Result:
    outputs: dict[str, np.ndarray]
    parameters: dict[str, Any]
    model_version: str = ""
    id: str = ""


def build_request(model: str, inputs: Mapping[str, np.ndarray], *, version: str = "",
                  parameters: Mapping[str, Any] | None = None, outputs: list[str] | None = None,
                  request_id: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    tensors.encode_inputs(request, inputs)
    for key, value in (parameters or {}).items():
        tensors.set_param(request.parameters, key, value)
    for name in outputs or []:
        request.outputs.add(name=name)
    return request


def to_result(response: pb.ModelInferResponse) -> Result:
    return Result(outputs=tensors.decode_outputs(response),
                  parameters=tensors.decode_parameters(response.parameters),
                  model_version=response.model_version, id=response.id)


class Client:
    """Blocking client."""

    def __init__(self, address: str, *, metadata: list[tuple[str, str]] | None = None,
                 tls: TLSConfig | None = None) -> None:
        # tls None: plaintext; else e.g. the mesh's security.client_tls.
        self.channel = open_sync_channel(address, tls, options=DEFAULT_OPTIONS)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.metadata = metadata or []

    def infer(self, model: str, inputs: Mapping[str, np.ndarray], *, timeout: float | None = None,
              **kw: Any) -> Result:
        response = self.stub.ModelInfer(build_request(model, inputs, **kw), timeout=timeout,
                                        metadata=self.metadata)
        return to_result(response)

    def ready(self, model: str | None = None) -> bool:
        if model is None:
            return self.stub.ServerReady(pb.ServerReadyRequest()).ready
        return self.stub.ModelReady(pb.ModelReadyRequest(name=model)).ready

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client (grpc.aio); one channel multiplexes any number of calls."""

    def __init__(self, address: str, *, metadata: list[tuple[str, str]] | None = None,
                 tls: TLSConfig | None = None) -> None:
        self.channel = open_channel(address, tls, options=DEFAULT_OPTIONS)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.metadata = metadata or []

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray], *,
                    timeout: float | None = None, **kw: Any) -> Result:
        response = await self.stub.ModelInfer(build_request(model, inputs, **kw), timeout=timeout,
                                              metadata=self.metadata)
        return to_result(response)

    async def stream(self, requests: list[pb.ModelInferRequest], *, timeout: float | None = None):
        """Send requests on one ModelStreamInfer stream; yield each response
        (``ModelStreamInferResponse``) as it arrives."""
        async def gen():
            for r in requests:
                yield r

        call = self.stub.ModelStreamInfer(gen(), timeout=timeout, metadata=self.metadata)
        async for response in call:
            yield response

    async def close(self) -> None:
        await self.channel.close()
