"""The OpenAI front door's pure parts: chat templates, stop sequences over a token
stream, request validation naming the field, and the error mapping."""
from __future__ import annotations

import grpc
import pytest

from cmesh.errors import FailedPrecondition, InvalidInput, ResourceExhausted, Unavailable
from cmesh.manifest import Manifest
from router.openai.errors import error_body, error_headers, http_status
from router.openai.prompts import DEFAULT_TEMPLATE, StopCutter, render_chat
from router.openai.schema import ChatRequest, CompletionRequest, EmbeddingRequest, parse

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]


def manifest(**metadata) -> Manifest:
    return Manifest(name="llm", version="1", engine="hf-causal-lm", metadata=metadata,
                    inputs=[{"name": "text_input", "datatype": "BYTES", "shape": [-1]}],
                    outputs=[{"name": "text_output", "datatype": "BYTES", "shape": [-1]}])


def test_the_manifests_template_or_the_default() -> None:
    from demo_store.tiny_llm import CHAT_TEMPLATE

    assert render_chat(manifest(chat_template=CHAT_TEMPLATE), "llm", MESSAGES) == "Be brief.\nCustomer: hello\nAgent:"
    assert render_chat(manifest(), "llm", MESSAGES) == "system: Be brief.\nuser: hello\nassistant:"
    assert "messages" in DEFAULT_TEMPLATE


def test_a_template_cannot_reach_python_and_a_broken_one_is_the_operators_fault() -> None:
    hostile = manifest(chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(FailedPrecondition, match="chat template of 'llm'"):
        render_chat(hostile, "llm", MESSAGES)
    with pytest.raises(FailedPrecondition):
        render_chat(manifest(chat_template="{% for %}"), "llm", MESSAGES)


@pytest.mark.parametrize("pieces, stops, text, stopped", [
    (["Hel", "lo wo", "rld"], [], "Hello world", False),
    (["Hel", "lo\nwo", "rld"], ["\n"], "Hello", True),
    (["ab", "cE", "ND", "zz"], ["END"], "abc", True),        # a stop split across pieces
    (["ab", "cE", "Nx"], ["END"], "abcENx", False),          # held back, then released
    (["the ", "end"], ["END", "end"], "the ", True),
])
def test_stop_sequences_over_a_stream(pieces, stops, text, stopped) -> None:
    cutter = StopCutter(stops)
    out = "".join(cutter.feed(p) for p in pieces) + cutter.flush()
    assert (out, cutter.stopped) == (text, stopped)


@pytest.mark.parametrize("kind, body, field", [
    (ChatRequest, {"model": "m", "messages": []}, "messages"),
    (ChatRequest, {"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    (ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
    (ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    (ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, "stop"),
    (ChatRequest, {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages.0.content"),
    (CompletionRequest, {"model": "m", "prompt": ["a", "b"]}, "prompt"),
    (EmbeddingRequest, {"model": "m", "input": []}, "input"),
    (EmbeddingRequest, {"model": "m", "input": "x", "encoding_format": "int8"}, "encoding_format"),
    (EmbeddingRequest, {"input": "x"}, "model"),
    (ChatRequest, ["not", "an", "object"], "body"),
])
def test_bad_bodies_name_the_field(kind, body, field) -> None:
    with pytest.raises(InvalidInput) as err:
        parse(kind, body)
    assert err.value.field.startswith(field), err.value.field


def test_unused_openai_fields_are_accepted_and_defaults_are_openais() -> None:
    chat = parse(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": [{"type": "text",
                                                                                         "text": "hi"}]}],
                               "user": "u-1", "logit_bias": {}, "max_completion_tokens": 7})
    assert chat.messages[0].text == "hi" and chat.token_limit == 7 and not chat.include_usage
    assert parse(CompletionRequest, {"model": "m", "prompt": "x"}).token_limit == 16


def test_errors_map_to_openai_statuses_and_retry_after() -> None:
    limited = ResourceExhausted("slow down", retry_after_ms=1200)
    assert http_status(limited) == 429 and error_headers(limited) == {"Retry-After": "2"}
    bad = InvalidInput("temperature", "too hot")
    assert http_status(bad) == 400
    assert error_body(bad)["error"] == {"message": "temperature: too hot", "type": "invalid_request_error",
                                        "param": "temperature", "code": "invalid_input"}
    down = Unavailable("no replica")
    assert http_status(down) == 503 and error_headers(down) == {}

    class Deadline(Unavailable):
        code = grpc.StatusCode.DEADLINE_EXCEEDED

    assert http_status(Deadline("late")) == 504
