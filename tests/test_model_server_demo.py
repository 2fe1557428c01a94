"""The demo models behind a real gRPC server: LLM token streaming with continuous
batching (acceptance 3), and the tool models' bad-input cases."""
import asyncio
import json

import grpc
import numpy as np
import pytest

from cmesh.client import AsyncClient, build_request
from cmesh.config import load_config
from meshtest import REPO, running_server

MODELS = ["dialogue-llm", "sql-executor", "intent-classifier", "kb-index", "embedder"]


@pytest.fixture(scope="module")
async def server(demo_store):
    config = load_config(REPO / "compose" / "mesh.yaml")
    config.store = str(demo_store)
    async with running_server(config, MODELS) as srv:
        yield srv


@pytest.fixture()
async def client(server):
    c = AsyncClient(f"127.0.0.1:{server.port}")
    yield c
    await c.close()


def prompt(text: str) -> dict:
    return {"text_input": np.array([text.encode()], dtype=object)}


def decode_batch_count(server, variant: str) -> tuple[float, float]:
    labels = {"model": "dialogue-llm", "variant": variant}
    reg = server.metrics.registry
    return (reg.get_sample_value("cmesh_model_batch_size_count", labels) or 0.0,
            reg.get_sample_value("cmesh_model_batch_size_sum", labels) or 0.0)


async def test_concurrent_token_streams_decode_in_the_same_batches(server, client) -> None:
    steps_before, rows_before = decode_batch_count(server, "a")
    prompts = [f"Customer: question number {i} about my order\nAgent:" for i in range(6)]

    async def one_stream(i: int) -> tuple[list[str], dict]:
        request = build_request("dialogue-llm", prompt(prompts[i]), version="a", request_id=f"s{i}",
                                parameters={"max_tokens": 24, "temperature": 0.0})
        pieces, final = [], {}
        async for response in client.stream([request], timeout=120):
            assert response.error_message == "", response.error_message
            r = response.infer_response
            assert r.id == f"s{i}"
            pieces.append(r.raw_output_contents[0][4:].decode())
            if r.parameters["triton_final_response"].bool_param:
                final = {k: v for k, v in r.parameters.items()}
        return pieces, final

    results = await asyncio.gather(*(one_stream(i) for i in range(6)))
    for pieces, final in results:
        assert len(pieces) >= 2                     # tokens arrived one by one, not as one answer
        assert final["cmesh-output-tokens"].int64_param == len(pieces)
        assert final["cmesh-batch-size"].int64_param > 1     # it decoded alongside other streams
        assert float(final["cmesh-compute-ms"].string_param) > 0     # text: any OIP client reads it
    steps, rows = decode_batch_count(server, "a")
    assert (rows - rows_before) / (steps - steps_before) > 1.5, "streams should share decode steps"
    # The same greedy prompt alone gives the same text as it did inside the batch.
    alone = await client.infer("dialogue-llm", prompt(prompts[0]), version="a",
                               parameters={"max_tokens": 24, "temperature": 0.0})
    assert alone.outputs["text_output"][0].decode() == "".join(results[0][0])


async def test_variants_are_distinct_models(client) -> None:
    text = {}
    for variant in ("a", "b"):
        r = await client.infer("dialogue-llm", prompt("Customer: I forgot my password\nAgent:"),
                               version=variant, parameters={"max_tokens": 16, "temperature": 0.0})
        assert r.model_version == variant
        text[variant] = r.outputs["text_output"][0]
    assert text["a"] != text["b"]


@pytest.mark.parametrize("params, field", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 100000}, "max_tokens"),
    ({"temperature": -1.0}, "temperature"),
])
async def test_llm_parameters_out_of_range(client, params, field) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.infer("dialogue-llm", prompt("hello"), parameters=params)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"{field}:")


def sql(query: str, params: dict | None = None) -> dict:
    inputs = {"query": np.array([query.encode()], dtype=object)}
    if params is not None:
        inputs["params"] = np.array([json.dumps(params).encode()], dtype=object)
    return inputs


async def test_sql_tool_answers_reads_and_refuses_everything_else(client) -> None:
    r = await client.infer("sql-executor", sql("SELECT order_id, status FROM orders WHERE order_id = :id",
                                               {"id": 1042}))
    rows = json.loads(r.outputs["rows"][0])
    assert rows == [{"order_id": 1042, "status": rows[0]["status"]}] and r.outputs["row_count"].tolist() == [1]
    for bad in ("DELETE FROM orders", "SELECT 1; DROP TABLE orders", "PRAGMA table_info(orders)",
                "SELECT * FROM orders WHERE order_id = ?", "ATTACH DATABASE 'x.db' AS x"):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.infer("sql-executor", sql(bad, {}))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert info.value.details().startswith("query:"), info.value.details()


async def test_classifier_and_retrieval_chain(client) -> None:
    question = {"text": np.array([b"How do I reset my password?"], dtype=object)}
    intent = await client.infer("intent-classifier", question)
    assert intent.outputs["label"][0] == b"password_reset"
    emb = await client.infer("embedder", question)
    hits = await client.infer("kb-index", {"embedding": emb.outputs["embedding"]}, parameters={"top_k": 3})
    assert hits.outputs["ids"][0][0] == b"kb-password-reset"
