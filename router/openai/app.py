"""The OpenAI front door's HTTP side: an aiohttp application in the router's
event loop. Routes parse and validate the body, map headers onto the mesh's
metadata, and hand over to ``Answers`` / ``Embeddings``; errors become OpenAI's
error JSON in one middleware. A client that disconnects cancels its handler
(``handler_cancellation``), and the cancellation reaches the replica's stream."""
from __future__ import annotations

import json
import logging
import ssl
from collections.abc import AsyncIterator

from aiohttp import web

from cmesh import wire
from cmesh.config import TLSConfig
from cmesh.errors import Internal, InvalidInput, MeshError, NotFound, PermissionDenied, ResourceExhausted
from router.openai.answers import Answers
from router.openai.embeddings import Embeddings
from router.openai.errors import error_body, error_headers, http_status
from router.openai.schema import ChatRequest, CompletionRequest, EmbeddingRequest, parse

log = logging.getLogger(__name__)

# HTTP headers -> the mesh's metadata keys (what the gRPC front door reads).
HEADERS = {"x-cmesh-latency-class": wire.P_CLASS, "x-cmesh-pipeline-id": wire.P_PIPELINE,
           "x-cmesh-session": wire.P_SESSION, "x-request-id": wire.P_REQUEST_ID,
           "x-cmesh-tenant": wire.M_TENANT}
TIMEOUT_HEADER = "x-cmesh-timeout-ms"


def metadata(request: web.Request) -> dict[str, str]:
    md = {"authorization": request.headers.get("Authorization", "")}
    for header, key in HEADERS.items():
        value = request.headers.get(header)
        if value:
            md[key] = value
    return md


def time_remaining(request: web.Request) -> float | None:
    value = request.headers.get(TIMEOUT_HEADER)
    if value is None:
        return None
    seconds = wire.timeout_s(value)
    if seconds is None:
        raise InvalidInput(TIMEOUT_HEADER, "must be a number of milliseconds > 0")
    return seconds


def _json_error(err: MeshError) -> web.Response:
    return web.json_response(error_body(err), status=http_status(err), headers=error_headers(err))


@web.middleware
async def openai_errors(request: web.Request, handler):
    try:
        return await handler(request)
    except MeshError as err:
        return _json_error(err)
    except web.HTTPRequestEntityTooLarge as exc:
        err = ResourceExhausted(f"body: {exc.text or 'request body too large'}")
        err.field = "body"
        return web.json_response(error_body(err), status=413)
    except web.HTTPException as exc:
        if exc.status == 404:
            return _json_error(NotFound(f"no route {request.method} {request.path}"))
        if exc.status == 405:
            return web.json_response(error_body(InvalidInput("method", f"{request.method} is not allowed on "
                                                                       f"{request.path}")), status=405)
        raise


class OpenAIFrontDoor:
    def __init__(self, core, door, pipelines, manifests) -> None:
        self.core = core
        self.door = door
        self.pipelines = pipelines
        self.answers = Answers(core, door, pipelines, manifests)
        self.embeddings = Embeddings(core, door, manifests)
        self._runner: web.AppRunner | None = None

    def application(self) -> web.Application:
        app = web.Application(middlewares=[openai_errors],
                              client_max_size=self.core.config.server.max_message_bytes)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embed)
        return app

    async def start(self, host: str, port: int, tls: TLSConfig | None) -> int:
        self._runner = web.AppRunner(self.application(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=_ssl_context(tls))
        await site.start()
        return site._server.sockets[0].getsockname()[1]

    async def stop(self, grace: float = 5.0) -> None:
        if self._runner is not None:
            await self._runner.shutdown()
            await self._runner.cleanup()

    # -- routes --------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        principal = self.door.auth.authenticate(request.headers.get("Authorization", ""))
        config = self.core.config
        data = []
        for name, cfg in config.models.items():
            if not cfg.internal and self._allowed(principal, [name]):
                data.append({"id": name, "object": "model", "created": 0, "owned_by": "cmesh",
                             "cmesh": {"kind": "model", "external": cfg.external}})
        for name, pipeline in config.pipelines.items():
            if self._allowed(principal, [n.model for n in pipeline.nodes.values()]):
                data.append({"id": name, "object": "model", "created": 0, "owned_by": "cmesh",
                             "cmesh": {"kind": "pipeline", "nodes": sorted(pipeline.nodes)}})
        return web.json_response({"object": "list", "data": data})

    def _allowed(self, principal, models: list[str]) -> bool:
        try:
            for model in models:
                self.door.gate.check_model(principal, model)
        except PermissionDenied:
            return False
        return True

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, ChatRequest)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, CompletionRequest)

    async def _generate(self, request: web.Request, kind) -> web.StreamResponse:
        body = parse(kind, await _body(request))
        answer = await self.answers.generate(metadata(request), time_remaining(request), body)
        if isinstance(answer, dict):
            return web.json_response(answer)
        return await _sse(request, answer)

    async def embed(self, request: web.Request) -> web.Response:
        body = parse(EmbeddingRequest, await _body(request))
        return web.json_response(await self.embeddings.embed(metadata(request), time_remaining(request), body))


async def _body(request: web.Request):
    raw = await request.read()
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise InvalidInput("body", f"is not valid JSON ({exc})") from None


async def _sse(request: web.Request, chunks: AsyncIterator[dict]) -> web.StreamResponse:
    """Server-Sent Events, ending in ``[DONE]``; a failure after the first chunk is
    an ``error`` event (the status line is long gone), as vLLM sends it."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    failure: MeshError | None = None
    try:
        async for chunk in chunks:
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    except MeshError as err:
        failure = err
    except ConnectionResetError:
        return response                 # the client left; closing the chunks cancelled the call
    except Exception:  # noqa: BLE001 - a bug of ours, told to the client in-band
        log.exception("streamed answer failed")
        failure = Internal("internal error")
    finally:
        await chunks.aclose()
    if failure is not None:
        await response.write(b"data: " + json.dumps(error_body(failure)).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _ssl_context(tls: TLSConfig | None) -> ssl.SSLContext | None:
    """The router's listener TLS for HTTPS too (cert/key; a client CA for mutual TLS)."""
    if tls is None or not tls.cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert, tls.key)
    if tls.client_auth and tls.ca:
        context.load_verify_locations(tls.ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
