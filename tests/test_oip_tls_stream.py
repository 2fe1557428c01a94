"""An ``oip`` backend over TLS, with its credential in a header, streamed through
``ModelStreamInfer`` (issue #12's "TLS and a per-backend credential", "and
ModelStreamInfer where the server has it").

The OIP server is a mesh model server serving ``tiny-llm`` on its own, outside the
router's mesh: TLS with the test CA, and it refuses any call without its token
(``x-cmesh-internal-token``), which the router sends as the backend's credential
from an environment variable read at the entry point. KServe's ModelServer (the
third-party server of test_kserve_backend) has no ModelStreamInfer, so this is the
real OIP streaming server at hand.
"""
from __future__ import annotations

import numpy as np
import pytest

from contextlib import asynccontextmanager

from cmesh.client import AsyncClient, build_request
from meshtest import mesh_config, running_server
from protos import inference_pb2 as pb
from router.backends.secrets import secrets_from_env
from router.server import RouterOptions, RouterServer

TOKEN = "oip-stream-token"
PROMPT = {"text_input": np.array([b"Customer: where is my order?\nAgent:"], dtype=object)}


def backend(address: str, pki, **extra) -> dict:
    return {"kind": "oip", "endpoints": [address], "model_name": "llm", "stream": True,
            "tls": {"ca": str(pki.ca), "server_name": "localhost"},
            "credential": {"header": "x-cmesh-internal-token", "env": "OIP_TEST_TOKEN"}, **extra}


@asynccontextmanager
async def router_client(config, token: str):
    router = RouterServer(config, RouterOptions(port=0,
                                                backend_secrets=secrets_from_env(config, {"OIP_TEST_TOKEN": token})))
    await router.start()
    client = AsyncClient(f"127.0.0.1:{router.port}")
    try:
        yield client
    finally:
        await client.close()
        await router.stop(grace=1.0)


async def ready(client: AsyncClient, model: str) -> bool:
    return (await client.stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=30)).ready


@pytest.fixture
async def server(demo_store, pki):
    security = {"server_tls": {"cert": str(pki.server_cert), "key": str(pki.server_key)},
                "internal_token_env": "CMESH_TEST_INTERNAL_TOKEN"}
    config = mesh_config(demo_store, {"llm": {"source": "store://tiny-llm/1", "engine": "hf-causal-lm"}},
                         security=security)
    async with running_server(config, ["llm"], internal_token=TOKEN) as replica:
        yield f"127.0.0.1:{replica.port}"


async def test_a_streamed_call_reaches_a_tls_oip_server_with_its_credential(demo_store, pki, server) -> None:
    config = mesh_config(demo_store, {"remote-llm": {"backend": backend(server, pki)}})
    async with router_client(config, TOKEN) as client:
        request = build_request("remote-llm", PROMPT, parameters={"max_tokens": 12, "temperature": 0.0})
        pieces = [r async for r in client.stream([request], timeout=60)]
        assert not any(p.error_message for p in pieces)
        assert len(pieces) > 2                                  # token by token, not one piece
        answers = [p.infer_response for p in pieces]
        assert {a.model_name for a in answers} == {"remote-llm"}          # our name, not the server's
        final = answers[-1].parameters
        assert final["triton_final_response"].bool_param
        assert final["cmesh-external"].bool_param
        assert float(final["cmesh-compute-ms"].string_param) > 0
        assert await ready(client, "remote-llm")                # asked of the server through its backend
        unary = await client.infer("remote-llm", PROMPT, parameters={"max_tokens": 4}, timeout=60)
        assert unary.outputs


async def test_a_wrong_credential_is_a_gateway_fault_and_the_model_is_not_ready(
        demo_store, pki, server) -> None:
    config = mesh_config(demo_store, {"remote-llm": {"backend": backend(server, pki)}})
    async with router_client(config, "wrong") as client:
        with pytest.raises(Exception) as info:
            await client.infer("remote-llm", PROMPT, parameters={"max_tokens": 4}, timeout=30)
        # The server refused the mesh's credential, not the caller's: a gateway fault.
        assert info.value.code().name == "UNAVAILABLE", info.value
        assert "refused the mesh's credential: UNAUTHENTICATED" in info.value.details()
        assert not await ready(client, "remote-llm")
