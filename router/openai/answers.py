"""Chat completions and completions on a model or a pipeline, independent of HTTP.

A model's answer is one typed ``Call`` through the router core, streamed from the
replica token by token (stop sequences cut by ``StopCutter``; the engine stops
generating at them too); ``usage`` is what the core metered. A pipeline's answer is
the pipeline runner's: the last user message is ``request.text``, the output node's
tokens stream as chunks, and the trace comes back in the ``cmesh`` extension field.

A streamed answer is returned primed (its first chunk already produced), so that
what fails before the first token - an unknown model, a rate limit, an open breaker -
is an HTTP error, and only later failures go in-band.
"""
from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping

import numpy as np
from google.protobuf.json_format import MessageToDict

from cmesh import wire
from cmesh.client import build_request
from cmesh.errors import InvalidInput, MeshError, NotFound, quote
from cmesh.tensors import output_texts
from protos import mesh_pb2
from router.backends.openai_wire import MESSAGES_IN
from router.call import Call
from router.openai.prompts import StopCutter, render_chat
from router.openai.schema import ChatRequest, CompletionRequest
from router.openai.shapes import Shape, usage
from router.servicer import answer_margin_s, require_public


async def primed(stream: AsyncIterator[dict]) -> AsyncIterator[dict]:
    first = await stream.__anext__()

    async def rest() -> AsyncIterator[dict]:
        try:
            yield first
            async for item in stream:
                yield item
        finally:
            await stream.aclose()

    return rest()


class Answers:
    def __init__(self, core, door, runner, manifests, wall=time.time) -> None:
        self.core = core
        self.door = door
        self.runner = runner            # router.pipelines.service.PipelineRunner
        self.manifests = manifests
        self._wall = wall

    async def generate(self, md: Mapping[str, str], remaining: float | None,
                       body: ChatRequest | CompletionRequest) -> dict | AsyncIterator[dict]:
        chat = isinstance(body, ChatRequest)
        config = self.core.config
        # Who is calling, before anything about a model is told (or looked up).
        principal = self.door.auth.authenticate(md.get("authorization"))
        if body.model in config.models:
            return await self._model(principal, md, remaining, body, chat)
        if body.model in config.pipelines:
            return await self._pipeline(principal, md, remaining, body, chat)
        raise NotFound(f"unknown model {quote(body.model)}: neither a model nor a pipeline of this mesh",
                       component=body.model)

    # -- models ----------------------------------------------------------------------

    async def _model(self, principal, md, remaining, body, chat: bool):
        model, config = body.model, self.core.config
        require_public(config, model)
        self.door.gate.check_model(principal, model)
        manifest = await self.manifests.get(model)
        if manifest.inputs[0].datatype != "BYTES" or manifest.outputs[0].datatype != "BYTES":
            raise InvalidInput("model", f"{model!r} is not a text generation model "
                                        f"(use /v1/embeddings for encoders)")
        if chat:
            prompt = render_chat(manifest, model, [{"role": m.role, "content": m.text} for m in body.messages])
        else:
            prompt = body.text
        params: dict = {}
        if body.token_limit is not None:
            params["max_tokens"] = body.token_limit
        if body.temperature is not None:
            params["temperature"] = body.temperature
        if body.seed is not None:
            params["seed"] = body.seed
        if body.stops:
            params["stop"] = json.dumps(body.stops)     # InferParameter holds no list
        inputs = {manifest.inputs[0].name: np.array([prompt.encode("utf-8")], dtype=object)}
        backend = config.models[model].backend
        if chat and backend.kind == "openai" and backend.openai_api == "chat":
            # The provider templates the messages itself (router.backends.openai_wire).
            messages = json.dumps([{"role": m.role, "content": m.text} for m in body.messages])
            inputs[MESSAGES_IN] = np.array([messages.encode("utf-8")], dtype=object)
        request = build_request(model, inputs, parameters=params)
        call = self.door.call_of(md, remaining, request, principal)
        # The answer's id is the metered request id (the idempotency key when sent).
        call.request_id = call.request_id or self.core.admission.new_id()
        shape = Shape(chat, ("chatcmpl-" if chat else "cmpl-") + call.request_id, int(self._wall()),
                      model, body.include_usage)
        cutter = StopCutter(body.stops)
        if body.stream:
            return await primed(self._model_chunks(call, cutter, shape, body.token_limit))
        text = "".join([piece async for piece in self._pieces(call, cutter)])
        acc = call.accounting
        return shape.whole(text, self._finish(cutter, acc.output_tokens, body.token_limit),
                           usage(acc.input_tokens, acc.output_tokens),
                           {"cmesh": {"request_id": call.request_id, "variant": acc.variant}})

    async def _pieces(self, call: Call, cutter: StopCutter) -> AsyncIterator[str]:
        # Consumed to the end even past a stop: the engine ends there itself, and the
        # last response carries the usage the core meters.
        async for response in self.core.stream(call):
            out = cutter.feed("".join(output_texts(response)))
            if out:
                yield out
        tail = cutter.flush()
        if tail:
            yield tail

    async def _model_chunks(self, call: Call, cutter: StopCutter, shape: Shape, limit: int | None):
        pieces = self._pieces(call, cutter)
        try:
            first = True
            async for piece in pieces:
                yield shape.chunk(piece, first=first)
                first = False
            if first:
                yield shape.chunk("", first=True)
        finally:
            await pieces.aclose()
        acc = call.accounting
        yield shape.chunk(finish_reason=self._finish(cutter, acc.output_tokens, limit))
        if shape.include_usage:
            yield shape.usage_chunk(usage(acc.input_tokens, acc.output_tokens),
                                    {"cmesh": {"request_id": call.request_id, "variant": acc.variant}})

    @staticmethod
    def _finish(cutter: StopCutter, output_tokens: int, limit: int | None) -> str:
        if not cutter.stopped and limit is not None and output_tokens >= limit:
            return "length"
        return "stop"

    # -- pipelines ---------------------------------------------------------------------

    async def _pipeline(self, principal, md, remaining, body, chat: bool):
        if chat:
            users = [m.text for m in body.messages if m.role == "user"]
            if not users:
                raise InvalidInput("messages", "a pipeline answers the last user message; there is none")
            text = users[-1]
        else:
            text = body.text
        # The runner validates the ids (as for a gRPC RunRequest).
        request = mesh_pb2.RunRequest(pipeline=body.model, inputs={"text": text},
                                      request_id=md.get(wire.P_REQUEST_ID) or self.core.admission.new_id(),
                                      session=md.get(wire.P_SESSION, ""))
        # As FrontDoor.call_of does for a model: our own error must beat the caller's deadline.
        budget = self.core.config.router.default_timeout_s if remaining is None \
            else remaining - answer_margin_s(remaining)
        shape = Shape(chat, ("chatcmpl-" if chat else "cmpl-") + request.request_id,
                      int(self._wall()), body.model, body.include_usage)
        cutter = StopCutter(body.stops)
        if body.stream:
            return await primed(self._pipeline_chunks(principal, request, budget, cutter, shape))
        final = await self.runner.run(principal, request, budget)
        text = cutter.feed(final.answer) + cutter.flush()
        return shape.whole(text, "stop", self._pipeline_usage(final), {"cmesh": self._extension(final)})

    async def _pipeline_chunks(self, principal, request, budget: float, cutter: StopCutter, shape: Shape):
        events = self.runner.events(principal, request, budget)
        first = True
        try:
            async for item in events:
                if isinstance(item, MeshError):
                    raise item
                if item.HasField("token"):
                    out = cutter.feed(item.token)
                    if out:
                        yield shape.chunk(out, first=first)
                        first = False
                elif item.HasField("final"):
                    tail = cutter.flush()
                    if tail or first:
                        yield shape.chunk(tail, first=first)
                    yield shape.chunk(finish_reason="stop")
                    # The trace travels in a last, choice-less chunk (where usage goes).
                    last = shape.usage_chunk(self._pipeline_usage(item.final), {"cmesh": self._extension(item.final)})
                    if not shape.include_usage:
                        last["usage"] = None
                    yield last
        finally:
            await events.aclose()

    @staticmethod
    def _pipeline_usage(final: mesh_pb2.RunResponse) -> dict:
        return usage(sum(n.input_tokens for n in final.trace.nodes), sum(n.output_tokens for n in final.trace.nodes))

    @staticmethod
    def _extension(final: mesh_pb2.RunResponse) -> dict:
        return {"trace": MessageToDict(final.trace, preserving_proto_field_name=True),
                "cost": final.cost, "degraded": final.degraded}
