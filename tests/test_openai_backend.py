"""Backend kind ``openai`` (issue #13): a model served by an OpenAI-compatible HTTP
API. The acceptance tests are a federation of two real routers on 127.0.0.1: router
B's openai-backed models point at router A's OpenAI front door, and A routes to a
real model server with the demo models (chat streamed and not, embeddings, a
pipeline node, metering and pricing per direction, masking before the mesh is left,
the breaker on a dead endpoint, no retry after the first token). The request and
error translation is tested against a fake provider (a small aiohttp app) and as
pure functions.
"""
from __future__ import annotations

import asyncio
import json

import grpc
import numpy as np
import pytest
import yaml
from aiohttp import ClientSession, web

from cmesh import wire
from cmesh.client import AsyncClient, build_request
from cmesh.config import parse_config
from cmesh.cost import build_report
from cmesh.errors import component_error_of
from cmesh.tensors import decode_outputs, decode_parameters
from meshtest import REPO, free_port, identity_text_model, running_server
from protos import mesh_pb2, mesh_pb2_grpc
from router.auth import Authenticator
from router.backends import openai_wire as ow
from router.backends.base import BackendError
from router.backends.openai_http import OpenAIBackend
from router.backends.secrets import secrets_from_env
from router.metering import MemoryMeter
from router.server import RouterOptions, RouterServer

KEY = "key-acme"                        # router A's tenant key: router B's provider key
EMAIL = "jane.doe@example.com"
QUESTION = b"Where is my order 1042?"


def texts(response) -> str:
    return "".join(v.decode() for piece in decode_outputs(response).values() for v in piece.reshape(-1))


# -- the federation -------------------------------------------------------------------

@pytest.fixture(scope="module")
def store(demo_store, tmp_path_factory):
    """The demo store (linked, never written) plus an echo model that shows what arrived."""
    root = tmp_path_factory.mktemp("federation-store")
    for entry in demo_store.iterdir():
        (root / entry.name).symlink_to(entry.resolve())
    identity_text_model(root, "echo")
    return root


def far_config(store, endpoints: list[str] | None = None):
    demo = yaml.safe_load((REPO / "compose" / "mesh.yaml").read_text())["models"]
    models = {name: dict(demo[name]) for name in ("dialogue-llm", "embedder")}
    models["echo"] = {"source": "store://echo/1"}
    for model in models.values():
        if endpoints:
            model["endpoints"] = endpoints
    return parse_config({"store": str(store), "models": models, "tenants": {"acme": {"api_keys_env": "K_ACME"}}})


def near_config(store, base: str, cut_base: str, dead_base: str):
    far = {"kind": "openai", "base_url": base, "api_key_env": "FAR_KEY"}
    return parse_config({
        "store": str(store),
        "router": {"breaker": {"failure_threshold": 3, "cool_down_s": 60}},
        "models": {
            "remote-llm": {"backend": {**far, "model": "dialogue-llm", "max_inflight_per_endpoint": 4},
                           "price": {"per_1k_input_tokens": 0.5, "per_1k_output_tokens": 2.0}},
            "remote-embedder": {"backend": {**far, "model": "embedder", "api": "embeddings"},
                                "price": {"per_1k_tokens": 0.1}},
            "remote-echo": {"backend": {**far, "model": "echo"}},
            "cut-llm": {"backend": {**far, "base_url": cut_base, "model": "dialogue-llm"}},
            "dead-llm": {"backend": {**far, "base_url": dead_base}},
        },
        "pipelines": {"remote-answer": {"output": "answer", "nodes": {
            "answer": {"model": "remote-llm", "input": "request.text", "stream": True,
                       "params": {"max_tokens": 12, "temperature": 0}}}}},
    })


class CuttingProxy:
    """Forwards chat calls to router A and drops the connection after ``events``
    server-sent events: the far side's HTTP side dying mid-stream."""

    def __init__(self, upstream: str, events: int = 4) -> None:
        self.upstream = upstream
        self.events = events
        self.requests = 0
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        body = await request.read()
        async with ClientSession() as session:
            async with session.post(f"{self.upstream}/chat/completions", data=body,
                                    headers={"Authorization": request.headers["Authorization"],
                                             "Content-Type": "application/json"}) as upstream:
                response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await response.prepare(request)
                seen = 0
                async for line in upstream.content:
                    await response.write(line)
                    seen += not line.strip()
                    if seen == self.events:
                        request.transport.close()          # gone, without [DONE]
                        return response
        return response

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"

    async def stop(self) -> None:
        await self._runner.cleanup()


@pytest.fixture(scope="module")
async def fed(store):
    async with running_server(far_config(store), ["dialogue-llm", "embedder", "echo"]) as replica:
        config_a = far_config(store, [f"127.0.0.1:{replica.port}"])
        far = RouterServer(config_a, RouterOptions(port=0, http_port=0), meter=MemoryMeter(),
                           auth=Authenticator.from_env(config_a, {"K_ACME": KEY}))
        await far.start()
        base = f"http://127.0.0.1:{far.http_port}/v1"
        proxy = CuttingProxy(base)
        cut_base = await proxy.start()
        config_b = near_config(store, base, cut_base, f"http://127.0.0.1:{free_port()}/v1")
        near = RouterServer(config_b, RouterOptions(port=0, backend_secrets=secrets_from_env(
            config_b, {"FAR_KEY": KEY})), meter=MemoryMeter())
        await near.start()
        client = AsyncClient(f"127.0.0.1:{near.port}")
        try:
            yield {"far": far, "near": near, "client": client, "proxy": proxy, "config": config_b,
                   "far_client": AsyncClient(f"127.0.0.1:{far.port}",
                                             metadata=[("authorization", f"Bearer {KEY}")])}
        finally:
            await client.close()
            await near.stop(grace=1.0)
            await proxy.stop()
            await far.stop(grace=1.0)


def llm_request(model: str, text: bytes = QUESTION, **params) -> "object":
    params = {"max_tokens": 12, "temperature": 0, "seed": 3, **params}
    return build_request(model, {"text_input": np.array([text], dtype=object)}, parameters=params)


async def stream(client: AsyncClient, request, timeout: float = 60) -> tuple[list, str]:
    answers, error = [], ""
    async for response in client.stream([request], timeout=timeout):
        if response.error_message:
            error = response.error_message
            break
        answers.append(response.infer_response)
    return answers, error


async def tokens(router, model: str) -> tuple[int, int]:
    await router.core.flush_metering()
    rows = [r for r in await router.meter.rows() if r.model == model]
    return sum(r.input_tokens for r in rows), sum(r.output_tokens for r in rows)


async def test_streamed_chat_through_the_far_router_arrives_token_by_token(fed) -> None:
    answers, error = await stream(fed["client"], llm_request("remote-llm"))
    assert not error
    pieces = [texts(a) for a in answers]
    assert len([p for p in pieces if p]) > 1 and "".join(pieces)          # several responses, text in them
    assert [wire.is_final(a) for a in answers] == [False] * (len(answers) - 1) + [True]
    last = decode_parameters(answers[-1].parameters)
    assert last[wire.P_INPUT_TOKENS] > 5 and 1 <= last[wire.P_OUTPUT_TOKENS] <= 12
    assert all(a.model_name == "remote-llm" for a in answers)
    whole = await fed["client"].infer("remote-llm", {"text_input": np.array([QUESTION], dtype=object)},
                                      parameters={"max_tokens": 12, "temperature": 0}, timeout=60)
    assert whole.outputs["text_output"][0] and wire.P_FINAL not in whole.parameters
    assert whole.parameters[wire.P_OUTPUT_TOKENS] >= 1


async def test_usage_is_the_far_sides_metered_and_priced_per_direction(fed) -> None:
    near, far = fed["near"], fed["far"]
    before_near, before_far = await tokens(near, "remote-llm"), await tokens(far, "dialogue-llm")
    answers, error = await stream(fed["client"], llm_request("remote-llm", max_tokens=10))
    assert not error
    after_near, after_far = await tokens(near, "remote-llm"), await tokens(far, "dialogue-llm")
    got = (after_near[0] - before_near[0], after_near[1] - before_near[1])
    assert got == (after_far[0] - before_far[0], after_far[1] - before_far[1])     # what A counted
    assert got[0] > 5 and 1 <= got[1] <= 10
    rows = [r for r in await near.meter.rows() if r.model == "remote-llm"]
    line = {ln.key: ln for ln in build_report(rows, fed["config"], "model").rows}["remote-llm"]
    assert line.cost == pytest.approx(line.input_tokens / 1000 * 0.5 + line.output_tokens / 1000 * 2.0)
    assert line.external_compute_s > 0                   # wall time: the provider reports no compute


async def test_embeddings_match_the_far_routers_own_answer(fed) -> None:
    sentences = np.array([b"How do I reset my password?", QUESTION, b"refund policy"], dtype=object)
    near = (await fed["client"].infer("remote-embedder", {"text": sentences}, timeout=60)).outputs["embedding"]
    direct = (await fed["far_client"].infer("embedder", {"text": sentences}, timeout=60)).outputs["embedding"]
    assert near.shape == direct.shape == (3, 384) and near.dtype == np.float32
    for got, want in zip(near, direct):
        assert float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want))) >= 0.999
    inputs, _ = await tokens(fed["near"], "remote-embedder")
    assert inputs > 0                                      # the provider's prompt tokens, metered


async def test_a_pipeline_node_on_the_openai_backend_streams_its_tokens(fed) -> None:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{fed['near'].port}")
    try:
        events = [e async for e in mesh_pb2_grpc.PipelinesStub(channel).RunStream(
            mesh_pb2.RunRequest(pipeline="remote-answer", inputs={"text": QUESTION.decode()}), timeout=60)]
    finally:
        await channel.close()
    tokens_seen = [e.token for e in events if e.HasField("token")]
    final = [e.final for e in events if e.HasField("final")]
    assert len([t for t in tokens_seen if t]) > 1 and final
    assert final[0].answer == "".join(tokens_seen)
    [node] = [n for n in final[0].trace.nodes if n.node == "answer"]
    assert node.input_tokens > 5 and node.output_tokens >= 1
    assert node.cost == pytest.approx(node.input_tokens / 1000 * 0.5 + node.output_tokens / 1000 * 2.0)


async def test_what_leaves_the_mesh_is_masked_before_it_goes(fed) -> None:
    prompt = f"Please write to {EMAIL} about order 1042".encode()
    answer = await fed["client"].infer("remote-echo", {"text_input": np.array([prompt], dtype=object)}, timeout=60)
    arrived = answer.outputs["text_output"][0].decode()         # what A's echo model received
    assert EMAIL not in arrived and "[EMAIL]" in arrived and "order 1042" in arrived
    near_masked = [r for r in fed["near"].audit.records if r["model"] == "remote-echo"]
    far_masked = [r for r in fed["far"].audit.records if r["model"] == "echo"]
    assert near_masked and near_masked[-1]["masked"].get("email") == 1
    # The far router found nothing left to mask: B masked it before it left.
    assert all(not r["masked"].get("email") for r in far_masked)


async def test_a_dead_endpoint_opens_the_breaker(fed) -> None:
    reasons = []
    for _ in range(5):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await fed["client"].infer("dead-llm", {"text_input": np.array([QUESTION], dtype=object)}, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        detail = component_error_of(info.value).detail
        reasons.append(detail.reason if detail else "")
    assert reasons[:3].count("breaker_open") == 0 and reasons[-1] == "breaker_open", reasons
    assert fed["near"].metrics.value("cmesh_router_breaker_state", component="dead-llm:default") == 2


async def test_nothing_is_retried_after_the_first_token(fed) -> None:
    near, proxy = fed["near"], fed["proxy"]
    answers, error = await stream(fed["client"], llm_request("cut-llm", max_tokens=200, temperature=0.9, seed=1))
    assert [texts(a) for a in answers if texts(a)] and error.startswith("UNAVAILABLE"), (len(answers), error)
    assert proxy.requests == 1                                   # sent once, never again
    assert near.metrics.value("cmesh_router_retries_total", model="cut-llm", code="UNAVAILABLE") == 0
    assert near.metrics.value("cmesh_router_retries_denied_total", model="cut-llm",
                              reason="response_started") == 1


# -- against a fake provider: what is sent, and every error --------------------------

class FakeProvider:
    """An OpenAI-compatible server that records requests and answers as told."""

    def __init__(self) -> None:
        self.seen: list[tuple[dict, dict]] = []
        self.reply: tuple[int, dict, dict] = (200, {}, {})
        self.sse: list[str] | None = None
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((dict(request.headers), await request.json()))
        if self.sse is not None:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for event in self.sse:
                await response.write(f"data: {event}\n\n".encode())
            await response.write_eof()
            return response
        status, body, headers = self.reply
        return web.json_response(body, status=status, headers=headers)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/{api:.*}", self.handle)
        app.router.add_get("/v1/models", self.models)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"


@pytest.fixture
async def provider():
    fake = FakeProvider()
    base = await fake.start()
    fake.base = base
    yield fake
    await fake._runner.cleanup()


def backend(base: str, **spec) -> OpenAIBackend:
    config = parse_config({"models": {"m": {"backend": {"kind": "openai", "base_url": base, "model": "gpt-x",
                                                        **spec}}}})
    return OpenAIBackend(base, "m", config.models["m"].backend, "s3cret", max_inflight=2)


CHAT = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}}


async def test_only_the_allow_listed_fields_and_the_key_leave(provider) -> None:
    provider.reply = (200, CHAT, {})
    b = backend(provider.base)
    request = llm_request("m", stop='["\\n", "END"]', **{wire.P_REQUEST_ID: "internal-id", "secret": "x"})
    request.parameters[wire.P_TIMEOUT_MS].int64_param = 500
    try:
        answer = await b.call(request, 5.0)
        assert await b.ready("m") and (await b.metadata("m")).outputs[0].name == "text_output"
    finally:
        await b.close()
    headers, body = provider.seen[0]
    assert headers["Authorization"] == "Bearer s3cret"
    assert not [h for h in headers if "cmesh" in h.lower()]
    assert body == {"model": "gpt-x", "messages": [{"role": "user", "content": QUESTION.decode()}],
                    "max_tokens": 12, "temperature": 0.0, "seed": 3, "stop": ["\n", "END"]}
    params = decode_parameters(answer.parameters)
    assert texts(answer) == "hello" and (params[wire.P_INPUT_TOKENS], params[wire.P_OUTPUT_TOKENS]) == (7, 2)
    assert wire.P_FINAL not in answer.parameters


@pytest.mark.parametrize("status, headers, code, reason, retryable, retry_after_ms", [
    (429, {"Retry-After": "2"}, grpc.StatusCode.RESOURCE_EXHAUSTED, "rate_limit_exceeded", True, 2000),
    (500, {}, grpc.StatusCode.UNAVAILABLE, "backend_unavailable", True, 0),
    (503, {"retry-after-ms": "250"}, grpc.StatusCode.UNAVAILABLE, "backend_unavailable", True, 250),
    (400, {}, grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument", False, 0),
    (401, {}, grpc.StatusCode.UNAVAILABLE, "backend_credential_refused", False, 0),
    (404, {}, grpc.StatusCode.NOT_FOUND, "not_found", False, 0),
])
async def test_provider_errors_map_to_our_codes(provider, status, headers, code, reason, retryable,
                                                retry_after_ms) -> None:
    provider.reply = (status, {"error": {"message": "no", "type": "x", "param": "temperature",
                                         "code": "rate_limit_exceeded" if status == 429 else None}}, headers)
    b = backend(provider.base)
    try:
        with pytest.raises(BackendError) as info:
            await b.call(llm_request("m"), 5.0)
    finally:
        await b.close()
    err = info.value
    assert (err.code, err.reason, err.retryable, err.retry_after_ms, err.started) == (
        code, reason, retryable, retry_after_ms, False)
    if status == 400:
        assert err.field == "temperature"


async def test_a_stream_failing_after_a_token_is_started_and_one_that_ends_well_carries_usage(provider) -> None:
    delta = json.dumps({"choices": [{"index": 0, "delta": {"content": "hel"}}]})
    provider.sse = [json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}), delta,
                    json.dumps({"choices": [{"index": 0, "delta": {"content": "lo"}}]}),
                    json.dumps({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}}), "[DONE]"]
    b = backend(provider.base)
    try:
        answers = [a async for a in b.stream(llm_request("m"), 5.0)]
        assert [texts(a) for a in answers] == ["hel", "lo", ""]
        assert decode_parameters(answers[-1].parameters)[wire.P_OUTPUT_TOKENS] == 2 and wire.is_final(answers[-1])
        assert provider.seen[-1][1]["stream_options"] == {"include_usage": True}
        provider.sse = [delta, json.dumps({"error": {"message": "boom", "type": "service_unavailable"}}), "[DONE]"]
        got = []
        with pytest.raises(BackendError) as info:
            async for a in b.stream(llm_request("m"), 5.0):
                got.append(a)
        assert len(got) == 1 and info.value.started and info.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        await b.close()


async def test_a_refused_connection_is_unavailable_and_retryable() -> None:
    b = backend(f"http://127.0.0.1:{free_port()}/v1")
    try:
        with pytest.raises(BackendError) as info:
            await b.call(llm_request("m"), 5.0)
        assert not await b.ready("m")
    finally:
        await b.close()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and info.value.retryable and not info.value.started


def test_embeddings_are_one_call_and_come_back_in_index_order() -> None:
    spec = parse_config({"models": {"e": {"backend": {"kind": "openai", "base_url": "https://api.example/v1",
                                                      "api": "embeddings"}}}}).models["e"].backend
    request = build_request("e", {"text": np.array([b"a", b"b"], dtype=object)})
    assert ow.request_body(spec, "e", request, stream=False) == {"model": "e", "input": ["a", "b"],
                                                                 "encoding_format": "float"}
    answer = ow.whole_answer(spec, "e", request, {"data": [{"index": 1, "embedding": [0.0, 1.0]},
                                                           {"index": 0, "embedding": [1.0, 0.0]}],
                                                  "usage": {"prompt_tokens": 2}})
    vectors = decode_outputs(answer)["embedding"]
    assert vectors.dtype == np.float32 and vectors.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert decode_parameters(answer.parameters)[wire.P_INPUT_TOKENS] == 2
    with pytest.raises(BackendError, match="embeddings for 2 inputs"):
        ow.whole_answer(spec, "e", request, {"data": [{"index": 0, "embedding": [1.0]}]})


def test_sse_events_and_retry_after_forms() -> None:
    events = ow.SseEvents()
    assert [events.feed(line) for line in [": comment\n", "data: {\"a\":\n", "data: 1}\n", "\n"]] == [
        None, None, None, '{"a":\n1}']
    assert ow.retry_after_ms({"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"}, now=1445412480.0) == 10_000
    assert ow.retry_after_ms({"retry-after": "soon"}) == 0


def test_completions_take_a_prompt() -> None:
    spec = parse_config({"models": {"c": {"backend": {"kind": "openai", "base_url": "http://h:8000/v1",
                                                      "api": "completions"}}}}).models["c"].backend
    body = ow.request_body(spec, "c", llm_request("c", stop="\n"), stream=True)
    assert body["prompt"] == QUESTION.decode() and body["stop"] == ["\n"] and body["stream"] is True
    assert ow.text_of_choice("completions", {"text": "x"}, delta=True) == "x"
    with pytest.raises(Exception, match="one prompt"):
        ow.request_body(spec, "c", build_request("c", {"text_input": np.array([b"a", b"b"], dtype=object)}),
                        stream=False)


async def test_the_far_key_is_required_at_start() -> None:
    config = parse_config({"models": {"m": {"backend": {"kind": "openai", "base_url": "http://h/v1",
                                                        "api_key_env": "NOPE"}}}})
    with pytest.raises(Exception, match="NOPE is not set"):
        secrets_from_env(config, {})
    await asyncio.sleep(0)


async def test_chat_through_the_front_door_sends_the_messages_themselves_masked(provider) -> None:
    """The OpenAI front door in front of an openai backend: the provider gets the
    caller's messages (it applies its own chat template), not our rendering of them
    as one prompt, and the trust layer has masked them before they left."""
    import openai

    provider.sse = [json.dumps({"choices": [{"index": 0, "delta": {"content": "hello"}, "finish_reason": None}]}),
                    json.dumps({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}), "[DONE]"]
    config = parse_config({"models": {"gpt": {"backend": {"kind": "openai", "base_url": provider.base,
                                                          "model": "gpt-x", "api_key_env": "GPT_KEY"}}}})
    router = RouterServer(config, RouterOptions(port=0, http_port=0,
                                                backend_secrets=secrets_from_env(config, {"GPT_KEY": "s3cret"})))
    await router.start()
    try:
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{router.http_port}/v1", api_key="x",
                                      max_retries=0) as client:
            answer = await client.chat.completions.create(model="gpt", max_tokens=5, messages=[
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": f"Mail {EMAIL} about order 1042"}])
    finally:
        await router.stop(grace=1.0)
    assert answer.choices[0].message.content == "hello" and answer.usage.prompt_tokens == 7
    _, body = provider.seen[-1]
    assert body["messages"] == [{"role": "system", "content": "You are terse."},
                                {"role": "user", "content": "Mail [EMAIL] about order 1042"}]
