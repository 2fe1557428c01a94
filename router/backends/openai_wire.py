"""The ``openai`` backend's translation, pure (no I/O): a mesh ``ModelInferRequest``
into an OpenAI API request body, the provider's answers (whole, streamed chunks,
embeddings) back into ``ModelInferResponse``s laid out as the mesh's own models
answer, and the provider's HTTP errors into ``BackendError``s.

Tensor names follow the mesh's models of the same kind (the demo store's
``hf-causal-lm`` and ``hf-encoder`` manifests): a generative model takes BYTES
``text_input`` [1] and answers BYTES ``text_output``; an encoder takes BYTES
``text`` [n] and answers FP32 ``embedding`` [n, d].

What leaves the mesh is built here from an allow-list: the text, the provider's
model name and the generation fields OpenAI defines. No ``cmesh-*`` parameter, id
or other caller parameter is copied into the body.
"""
from __future__ import annotations

import email.utils
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
import numpy as np

from cmesh import wire
from cmesh.config import BackendConfig
from cmesh.errors import InvalidInput, clip
from cmesh.tensors import decode_inputs, decode_parameters, encode_outputs
from protos import inference_pb2 as pb
from router.backends.base import BackendError

TEXT_IN, TEXT_OUT = "text_input", "text_output"         # generative (hf-causal-lm)
# A chat's messages as JSON in a BYTES input, from a front door that has them (the
# OpenAI one): sent as they are instead of one user message, so the provider applies
# its own chat template. A tensor, not a parameter, so the trust layer masks it too.
MESSAGES_IN = "messages"
MAX_MESSAGES = 256
EMBED_IN, EMBED_OUT = "text", "embedding"               # encoders (hf-encoder)
PATHS = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings"}
# Request parameters the provider understands, as OpenAI names them.
GENERATION = {"max_tokens": int, "temperature": float, "top_p": float, "seed": int}


def names(api: str) -> tuple[str, str]:
    """(input, output) tensor names of a model on ``api``."""
    return (EMBED_IN, EMBED_OUT) if api == "embeddings" else (TEXT_IN, TEXT_OUT)


def metadata(model: str, spec: BackendConfig) -> pb.ModelMetadataResponse:
    """The model's OIP metadata from config (the provider publishes none)."""
    name_in, name_out = names(spec.openai_api)
    out = (pb.ModelMetadataResponse.TensorMetadata(name=name_out, datatype="FP32", shape=[-1, -1])
           if spec.openai_api == "embeddings"
           else pb.ModelMetadataResponse.TensorMetadata(name=name_out, datatype="BYTES", shape=[-1]))
    return pb.ModelMetadataResponse(
        name=model, platform="openai", versions=[],
        inputs=[pb.ModelMetadataResponse.TensorMetadata(name=name_in, datatype="BYTES", shape=[-1])],
        outputs=[out])


# -- requests -------------------------------------------------------------------------

def _texts(request: pb.ModelInferRequest, expected: str) -> list[str]:
    inputs = decode_inputs(request)
    if expected in inputs:
        values = inputs[expected]
    elif len(inputs) == 1:
        values = next(iter(inputs.values()))
    else:
        raise InvalidInput(expected, f"the request has no {expected!r} input (got {sorted(inputs)})")
    if values.dtype != np.object_:
        raise InvalidInput(expected, "must be BYTES text")
    return [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v) for v in values.reshape(-1)]


def _messages(request: pb.ModelInferRequest) -> list[dict] | None:
    if not any(t.name == MESSAGES_IN for t in request.inputs):
        return None
    (raw,) = decode_inputs(request)[MESSAGES_IN].reshape(-1)[:1] or [b""]
    try:
        messages = json.loads(raw)
    except ValueError:
        raise InvalidInput(MESSAGES_IN, "must be a JSON array of {role, content}") from None
    if not isinstance(messages, list) or not 0 < len(messages) <= MAX_MESSAGES or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise InvalidInput(MESSAGES_IN, f"must be a JSON array of 1 to {MAX_MESSAGES} {{role, content}} strings")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _stops(value) -> list[str]:
    """``stop``: one string or a JSON array of them (``hf_causal_lm._stops``)."""
    if not isinstance(value, str) or not value:
        return []
    if value.startswith("["):
        try:
            stops = json.loads(value)
        except ValueError:
            return [value]
        if isinstance(stops, list) and all(isinstance(s, str) for s in stops):
            return stops[:4]
    return [value]


def _generation(params: Mapping) -> dict:
    out = {}
    for key, kind in GENERATION.items():
        value = params.get(key)
        if value is None or isinstance(value, bool):
            continue
        try:
            number = kind(value)
        except (TypeError, ValueError):
            raise InvalidInput(key, f"must be a number, got {value!r}") from None
        if isinstance(number, float) and not math.isfinite(number):
            raise InvalidInput(key, "must be finite")
        out[key] = number
    stops = _stops(params.get("stop"))
    if stops:
        out["stop"] = stops
    return out


def request_body(spec: BackendConfig, model: str, request: pb.ModelInferRequest, *, stream: bool) -> dict:
    """The provider's JSON body for ``request`` (``stream``: SSE with usage last)."""
    api = spec.openai_api
    name_in, _ = names(api)
    texts = _texts(request, name_in)
    body: dict = {"model": spec.model or model}
    if api == "embeddings":
        body.update(input=texts, encoding_format="float")
        return body
    if len(texts) != 1:
        raise InvalidInput(name_in, f"a generative model takes one prompt, got {len(texts)}")
    if api == "chat":
        body["messages"] = _messages(request) or [{"role": "user", "content": texts[0]}]
    else:
        body["prompt"] = texts[0]
    body.update(_generation(decode_parameters(request.parameters)))
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


# -- answers --------------------------------------------------------------------------

@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0


def usage_of(body: Mapping) -> Usage | None:
    raw = body.get("usage")
    if not isinstance(raw, Mapping):
        return None

    def count(key: str) -> int:
        value = raw.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0

    return Usage(count("prompt_tokens"), count("completion_tokens"))


def _answer(request: pb.ModelInferRequest, model: str, outputs: dict, usage: Usage | None) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model, model_version=request.model_version, id=request.id)
    encode_outputs(response, outputs)
    if usage is not None:
        wire.set_param(response.parameters, wire.P_INPUT_TOKENS, usage.input_tokens)
        wire.set_param(response.parameters, wire.P_OUTPUT_TOKENS, usage.output_tokens)
    return response


def text_of_choice(api: str, choice: Mapping, *, delta: bool) -> str:
    if api == "chat":
        part = choice.get("delta" if delta else "message")
        content = part.get("content") if isinstance(part, Mapping) else None
    else:
        content = choice.get("text")
    return content if isinstance(content, str) else ""


def first_choice(body: Mapping) -> Mapping | None:
    choices = body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], Mapping):
        return choices[0]
    return None


def whole_answer(spec: BackendConfig, model: str, request: pb.ModelInferRequest, body: Mapping
                 ) -> pb.ModelInferResponse:
    """A non-streamed chat or completion answer, or an embeddings answer."""
    if spec.openai_api == "embeddings":
        return embedding_answer(model, request, body)
    choice = first_choice(body)
    if choice is None:
        raise malformed(model, "an answer without choices")
    text = text_of_choice(spec.openai_api, choice, delta=False)
    return _answer(request, model, {TEXT_OUT: np.array([text.encode("utf-8")], dtype=object)}, usage_of(body))


def embedding_answer(model: str, request: pb.ModelInferRequest, body: Mapping) -> pb.ModelInferResponse:
    data = body.get("data")
    expected = len(_texts(request, EMBED_IN))
    if not isinstance(data, list) or len(data) != expected:
        raise malformed(model, f"embeddings for {expected} inputs expected")
    try:
        rows = sorted(data, key=lambda d: d["index"])
        vectors = np.asarray([d["embedding"] for d in rows], dtype=np.float32)
    except (KeyError, TypeError, ValueError):
        raise malformed(model, "embeddings that are not lists of floats (encoding_format float)") from None
    if vectors.ndim != 2:
        raise malformed(model, "embeddings of unequal length")
    usage = usage_of(body)
    return _answer(request, model, {EMBED_OUT: vectors}, Usage(usage.input_tokens, 0) if usage else None)


def delta_response(model: str, request: pb.ModelInferRequest, text: str) -> pb.ModelInferResponse:
    """One streamed piece, laid out as a mesh LLM replica streams it."""
    response = _answer(request, model, {TEXT_OUT: np.array([text.encode("utf-8")], dtype=object)}, None)
    response.parameters[wire.P_FINAL].bool_param = False
    return response


def final_response(model: str, request: pb.ModelInferRequest, usage: Usage | None) -> pb.ModelInferResponse:
    """The stream's last response: no text, the provider's usage (what is metered)."""
    response = _answer(request, model, {}, usage or Usage())
    response.parameters[wire.P_FINAL].bool_param = True
    return response


class SseEvents:
    """Server-sent events from lines: ``feed`` answers an event's data once the
    blank line that ends it arrives (several ``data:`` lines are joined)."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        line = line.rstrip("\r\n")
        if not line:
            data, self._data = self._data, []
            return "\n".join(data) if data else None
        if line.startswith("data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None              # comments, event names and ids carry nothing we use


# -- errors ---------------------------------------------------------------------------

# OpenAI's error types as the mesh's own front door sends them (router.openai.errors).
_TYPES = {"invalid_request_error": 400, "authentication_error": 401, "permission_error": 403,
          "not_found_error": 404, "rate_limit_error": 429, "service_unavailable": 503, "timeout": 504}


def malformed(model: str, what: str) -> BackendError:
    return BackendError(grpc.StatusCode.UNAVAILABLE, f"openai backend of {model!r} answered {what}",
                        reason="backend_malformed_answer", retryable=False, component=model)


def retry_after_ms(headers: Mapping[str, str], now: float | None = None) -> int:
    """``retry-after-ms`` (OpenAI's), else ``Retry-After`` in seconds or as an HTTP date."""
    raw = headers.get("retry-after-ms")
    if raw:
        try:
            return max(0, int(float(raw)))
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return 0
    try:
        return max(0, int(float(raw) * 1000))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw).timestamp()
    except (TypeError, ValueError):
        return 0
    return max(0, int((when - (time.time() if now is None else now)) * 1000))


def _detail(body) -> tuple[str, str, str]:
    """(message, param, code) of OpenAI's error JSON (or of any text)."""
    err = body.get("error") if isinstance(body, Mapping) else None
    if isinstance(err, Mapping):
        return (str(err.get("message") or ""), str(err.get("param") or ""), str(err.get("code") or ""))
    if isinstance(err, str):
        return err, "", ""
    return (clip(str(body)) if body else ""), "", ""


def error_of_status(status: int, body, headers: Mapping[str, str], *, model: str, address: str,
                    started: bool = False) -> BackendError:
    """The provider's HTTP error as the mesh's status: 400 → INVALID_ARGUMENT (the
    caller's), 401/403 → our credential refused (a gateway fault), 404 → NOT_FOUND,
    429 → RESOURCE_EXHAUSTED with its retry-after, 5xx → UNAVAILABLE (retryable
    until the first token)."""
    message, param, code = _detail(body)
    text = f"openai backend {address}: HTTP {status}: {clip(message)}"
    kw = dict(started=started, component=model)
    if status in (400, 422):
        return BackendError(grpc.StatusCode.INVALID_ARGUMENT, text, field=param, retryable=False, **kw)
    if status in (401, 403):
        return BackendError(grpc.StatusCode.UNAVAILABLE, f"{text} (the backend refused the mesh's credential)",
                            reason="backend_credential_refused", retryable=False, **kw)
    if status == 404:
        return BackendError(grpc.StatusCode.NOT_FOUND, text, retryable=False, **kw)
    if status == 413:
        return BackendError(grpc.StatusCode.INVALID_ARGUMENT, text, field="body", retryable=False, **kw)
    if status == 429:
        return BackendError(grpc.StatusCode.RESOURCE_EXHAUSTED, text, reason=code or "backend_rate_limited",
                            retry_after_ms=retry_after_ms(headers), **kw)
    if status in (408, 504):
        return BackendError(grpc.StatusCode.DEADLINE_EXCEEDED, text, retryable=False, **kw)
    if status >= 500:
        return BackendError(grpc.StatusCode.UNAVAILABLE, text, reason="backend_unavailable",
                            retry_after_ms=retry_after_ms(headers), **kw)
    return BackendError(grpc.StatusCode.FAILED_PRECONDITION, text, retryable=False, **kw)


def error_in_stream(body: Mapping, *, model: str, address: str, started: bool) -> BackendError:
    """An error event in the stream (the HTTP status was 200 by then): its type
    says which status it would have had."""
    err = body.get("error")
    kind = err.get("type") if isinstance(err, Mapping) else None
    return error_of_status(_TYPES.get(kind, 502), body, {}, model=model, address=address, started=started)
