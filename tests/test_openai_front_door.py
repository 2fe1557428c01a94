"""The OpenAI API as the router's second front door, driven by the official
``openai`` client (sync and async, streamed and not) against a real router in front
of a real model server with the demo models (issue #13, acceptance 1).

The sync client runs in a worker thread (``asyncio.to_thread``) so the router's
event loop, which is this test's loop, keeps serving it.
"""
from __future__ import annotations

import asyncio
import base64

import aiohttp
import numpy as np
import openai
import pytest
import yaml

from cmesh.client import AsyncClient
from cmesh.config import parse_config
from meshtest import REPO, running_server
from router.auth import Authenticator
from router.server import RouterOptions, RouterServer

MODELS = ["dialogue-llm", "sql-executor", "intent-classifier", "kb-index", "embedder"]
KEY, SLOW_KEY, OTHER_KEY = "key-acme", "key-slow", "key-other"


def demo_config(store, endpoints: list[str] | None = None):
    data = yaml.safe_load((REPO / "compose" / "mesh.yaml").read_text())
    data["store"] = str(store)
    data.pop("security", None)
    data.pop("schedules", None)
    for name, model in data["models"].items():
        if endpoints is not None:
            model["endpoints"] = endpoints
        if name == "kb-index":
            model["tenants"] = ["acme", "slow"]        # not for tenant "other"
    data["tenants"] = {"acme": {"api_keys_env": "K_ACME"}, "slow": {"api_keys_env": "K_SLOW", "rate_per_s": 0.01,
                                                                   "burst": 1},
                       "other": {"api_keys_env": "K_OTHER"}}
    return parse_config(data)


@pytest.fixture(scope="module")
async def mesh(demo_store):
    async with running_server(demo_config(demo_store), MODELS) as replica:
        config = demo_config(demo_store, [f"127.0.0.1:{replica.port}"])
        auth = Authenticator.from_env(config, {"K_ACME": KEY, "K_SLOW": SLOW_KEY, "K_OTHER": OTHER_KEY})
        router = RouterServer(config, RouterOptions(port=0, http_port=0), auth=auth)
        await router.start()
        try:
            yield {"router": router, "replica": replica, "base": f"http://127.0.0.1:{router.http_port}/v1"}
        finally:
            await router.stop(grace=1.0)


def sync_client(mesh, key: str = KEY, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh["base"], api_key=key, max_retries=0, **kw)


def async_client(mesh, key: str = KEY, **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=mesh["base"], api_key=key, max_retries=0, **kw)


async def post(mesh, path: str, status: int = 200, **kw) -> dict:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:
        async with session.post(f"{mesh['base']}/{path}", **kw) as response:
            assert response.status == status
            return await response.json()


PIN = {"x-cmesh-session": "one-session"}        # one A/B variant for every call that sends it
ORDER_QUESTION = [{"role": "user", "content": "Where is my order 1042?"}]


async def test_chat_completion_sync_with_usage(mesh) -> None:
    def chat():
        with sync_client(mesh) as client:
            return client.chat.completions.create(model="dialogue-llm", messages=ORDER_QUESTION, max_tokens=12,
                                                  temperature=0, seed=3, extra_headers={"x-request-id": "req-42"})

    answer = await asyncio.to_thread(chat)
    assert answer.object == "chat.completion" and answer.model == "dialogue-llm"
    assert answer.id == "chatcmpl-req-42"                   # x-request-id: the metered idempotency key
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].message.content
    assert answer.choices[0].finish_reason in ("stop", "length")
    u = answer.usage
    assert u.prompt_tokens > 5 and 1 <= u.completion_tokens <= 12
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


async def test_chat_stream_async_ends_with_usage(mesh) -> None:
    async with async_client(mesh) as client:
        stream = await client.chat.completions.create(model="dialogue-llm", messages=ORDER_QUESTION, max_tokens=10,
                                                      temperature=0, stream=True,
                                                      stream_options={"include_usage": True}, extra_headers=PIN)
        chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert all(c.usage is None for c in chunks[:-1])
    # The same prompt, unstreamed and greedy, says the same.
    async with async_client(mesh) as client:
        whole = await client.chat.completions.create(model="dialogue-llm", messages=ORDER_QUESTION, max_tokens=10,
                                                     temperature=0, extra_headers=PIN)
    assert whole.choices[0].message.content == text


async def test_completions_and_stop_sequences(mesh) -> None:
    async with async_client(mesh) as client:
        free = await client.completions.create(model="dialogue-llm", prompt="Customer: hello\nAgent:",
                                               max_tokens=30, temperature=0, extra_headers=PIN)
        text = free.choices[0].text
        stop = text.strip()[:3]
        cut = await client.completions.create(model="dialogue-llm", prompt="Customer: hello\nAgent:",
                                              max_tokens=30, temperature=0, stop=[stop], extra_headers=PIN)
        streamed = await client.completions.create(model="dialogue-llm", prompt="Customer: hello\nAgent:",
                                                   max_tokens=30, temperature=0, stop=stop, stream=True, extra_headers=PIN)
        pieces = [c.choices[0].text async for c in streamed if c.choices]
    assert free.object == "text_completion" and stop
    assert stop not in cut.choices[0].text and text.startswith(cut.choices[0].text)
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens < free.usage.completion_tokens
    assert "".join(pieces) == cut.choices[0].text


async def test_embeddings_float_and_base64_match_the_grpc_path(mesh) -> None:
    texts = ["How do I reset my password?", "Where is my order 1042?", "refund policy"]
    async with async_client(mesh) as client:
        floats = await client.embeddings.create(model="embedder", input=texts, encoding_format="float")
        b64 = await client.embeddings.create(model="embedder", input=texts)        # the SDK's default: base64
    grpc = AsyncClient(f"127.0.0.1:{mesh['router'].port}", metadata=[("authorization", f"Bearer {KEY}")])
    try:
        direct = (await grpc.infer("embedder", {"text": np.array([t.encode() for t in texts], dtype=object)},
                                   timeout=30)).outputs["embedding"]
    finally:
        await grpc.close()
    assert [d.index for d in floats.data] == [0, 1, 2] and floats.usage.prompt_tokens >= 0
    for i, want in enumerate(direct):
        for got in (np.array(floats.data[i].embedding), np.array(b64.data[i].embedding)):
            cos = float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want)))
            assert cos >= 0.999, cos
    # Raw base64 as the wire carries it: little-endian float32.
    raw = await post(mesh, "embeddings", json={"model": "embedder", "input": "hello", "encoding_format": "base64"})
    assert np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4").shape == (384,)


async def test_the_support_agent_pipeline_as_a_model_streamed_and_not(mesh) -> None:
    async with async_client(mesh) as client:
        whole = await client.chat.completions.create(model="support-agent", messages=ORDER_QUESTION)
        stream = await client.chat.completions.create(model="support-agent", messages=ORDER_QUESTION, stream=True,
                                                      stream_options={"include_usage": True})
        chunks = [c async for c in stream]
    ext = whole.model_extra["cmesh"]
    nodes = {n["node"] for n in ext["trace"]["nodes"]}
    assert {"intent", "embed", "retrieve", "answer"} <= nodes and ext["trace"]["critical_path"]
    assert ext["cost"] > 0 and whole.choices[0].message.content
    assert whole.usage.completion_tokens >= 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1   # token by token
    assert chunks[-1].usage.total_tokens >= 1 and "trace" in chunks[-1].model_extra["cmesh"]


async def test_models_list_is_what_the_tenant_may_use(mesh) -> None:
    async with async_client(mesh) as client:
        ids = {m.id async for m in client.models.list()}
    async with async_client(mesh, OTHER_KEY) as client:
        other = {m.id async for m in client.models.list()}
    assert {"dialogue-llm", "embedder", "support-agent", "code-review", "kb-index"} <= ids
    assert "sql-executor" not in ids                      # internal: a pipeline node only
    assert "kb-index" not in other and "support-agent" not in other and "dialogue-llm" in other


async def test_every_error_status(mesh) -> None:
    async with async_client(mesh) as client:
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(model="dialogue-llm", messages=ORDER_QUESTION, temperature=5)
        assert bad.value.status_code == 400 and bad.value.body["param"] == "temperature"
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(model="dialogue-llm", messages=ORDER_QUESTION, max_tokens=100000)
        assert bad.value.body["param"] == "max_tokens"          # the engine's own check, named
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="no-such-model", messages=ORDER_QUESTION)
        with pytest.raises(openai.PermissionDeniedError):
            await client.embeddings.create(model="sql-executor", input="x")        # internal
    async with async_client(mesh, "wrong-key") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
    async with async_client(mesh, SLOW_KEY) as client:
        await client.embeddings.create(model="embedder", input="first")
        with pytest.raises(openai.RateLimitError) as limited:
            await client.embeddings.create(model="embedder", input="second")
        assert int(limited.value.response.headers["retry-after"]) >= 1
    async with async_client(mesh, default_headers={"x-cmesh-timeout-ms": "1"}) as client:
        with pytest.raises(openai.APIStatusError) as late:
            await client.chat.completions.create(model="dialogue-llm", messages=ORDER_QUESTION, max_tokens=200)
        assert late.value.status_code == 504
    bad_json = await post(mesh, "chat/completions", data=b"{not json", status=400)
    assert bad_json["error"]["param"] == "body" and bad_json["error"]["type"] == "invalid_request_error"
    huge = await post(mesh, "embeddings", data=b"x" * (5 * 2**20), status=413)      # over server.max_message_bytes
    assert huge["error"]["param"] == "body"


async def test_unavailable_is_503(demo_store) -> None:
    config = demo_config(demo_store, ["127.0.0.1:9"])            # nothing listens there
    auth = Authenticator.from_env(config, {"K_ACME": KEY, "K_SLOW": SLOW_KEY, "K_OTHER": OTHER_KEY})
    router = RouterServer(config, RouterOptions(port=0, http_port=0), auth=auth)
    await router.start()
    try:
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{router.http_port}/v1", api_key=KEY,
                                      max_retries=0) as client:
            with pytest.raises(openai.APIStatusError) as down:
                await client.embeddings.create(model="embedder", input="x", timeout=20,
                                               extra_headers={"x-cmesh-timeout-ms": "3000"})
        assert down.value.status_code == 503 and down.value.body["type"] == "service_unavailable"
    finally:
        await router.stop(grace=1.0)


async def test_a_client_disconnect_mid_stream_frees_the_replica_slot(mesh) -> None:
    replica = mesh["replica"]

    def running() -> float:
        return sum(replica.metrics.registry.get_sample_value("cmesh_model_in_flight",
                                                             {"model": "dialogue-llm", "variant": v}) or 0.0
                   for v in ("a", "b"))

    async def settled() -> float:
        for _ in range(500):                       # what earlier tests left generating, if anything
            if running() == 0:
                break
            await asyncio.sleep(0.02)
        return running()

    assert await settled() == 0
    async with async_client(mesh) as client:
        stream = await client.chat.completions.create(model="dialogue-llm", messages=ORDER_QUESTION,
                                                      max_tokens=250, temperature=0.9, seed=1, stream=True,
                                                      extra_headers={"x-cmesh-session": "pin-a"})
        got = 0
        async for _chunk in stream:
            got += 1
            if got == 3:
                busy = running()              # the replica is generating for us
                break
        await stream.close()
    assert got == 3 and busy == 1 and await settled() == 0


async def test_nothing_about_a_model_is_told_before_the_caller_is_known(mesh) -> None:
    async with async_client(mesh, "wrong-key") as client:
        for call in (lambda: client.chat.completions.create(model="no-such-model", messages=ORDER_QUESTION),
                     lambda: client.embeddings.create(model="dialogue-llm", input="x"),
                     lambda: client.chat.completions.create(model="support-agent", messages=ORDER_QUESTION)):
            with pytest.raises(openai.AuthenticationError):
                await call()
    async with async_client(mesh, OTHER_KEY) as client:
        with pytest.raises(openai.PermissionDeniedError):           # kb-index is not for tenant "other"
            await client.embeddings.create(model="kb-index", input="x")


async def test_an_overlong_request_id_is_refused_by_name_for_models_and_pipelines(mesh) -> None:
    async with async_client(mesh, default_headers={"x-request-id": "r" * 5000}) as client:
        for model in ("dialogue-llm", "support-agent"):
            with pytest.raises(openai.BadRequestError) as bad:
                await client.chat.completions.create(model=model, messages=ORDER_QUESTION, max_tokens=4)
            assert "request" in bad.value.body["param"] and "characters" not in bad.value.body["param"]
