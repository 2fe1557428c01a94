"""kb-index/1 built from the real MiniLM, served by the ``vector-index`` engine."""
from __future__ import annotations

import json

import numpy as np
import pytest

from demo_store import _build_atomically, kb_index, minilm
from demo_store.base import BuildContext
from cmesh.errors import InvalidInput
from cmesh.store import ModelStore
from model_server.engines.base import EngineContext, InferItem
from model_server.engines.vector_index import VectorIndexEngine, parse_top_k, top_k

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def kb_store(tmp_path_factory):
    # Built with the recipes directly: the full bootstrap also needs every other
    # artifact module, which this test does not depend on.
    store = tmp_path_factory.mktemp("kb-store")
    ctx = BuildContext(store=store, progress=lambda line: None)
    for artifact in (*minilm.ARTIFACTS, *kb_index.ARTIFACTS):
        _build_atomically(store, artifact, ctx)
    return store


@pytest.fixture(scope="session")
def embedder(kb_store):
    engine = kb_index.load_embedder(kb_store / "minilm-l6" / "1")
    yield engine
    engine.unload()


@pytest.fixture(scope="session")
def index(kb_store):
    version = ModelStore(str(kb_store)).open("store://kb-index/1")
    m = version.manifest
    engine = VectorIndexEngine(EngineContext(
        model="kb-index", variant="default", model_dir=version.local_dir, manifest=m,
        max_batch_size=m.batching.max_batch_size, options=dict(m.options)))
    engine.load()
    engine.warmup()
    yield engine
    engine.unload()


def item(index, vectors, **params) -> InferItem:
    return index.prepare({"embedding": np.asarray(vectors, dtype=np.float32)}, params)


def search(index, embedder, question: str, **params):
    result = index.run_batch([item(index, embedder.embed([question]), **params)])[0]
    assert result.error is None
    return ([i.decode() for i in result.outputs["ids"][0]],
            result.outputs["scores"][0].tolist())


# -- the built artifact ----------------------------------------------------------------

def test_manifest_and_files(kb_store):
    version = ModelStore(str(kb_store)).open("store://kb-index/1")
    m = version.manifest
    assert m.engine == "vector-index"
    assert [(t.name, t.datatype, t.shape) for t in m.inputs] == [("embedding", "FP32", [-1, 384])]
    assert [(t.name, t.datatype, t.shape) for t in m.outputs] == [
        ("ids", "BYTES", [-1, -1]), ("scores", "FP32", [-1, -1]), ("passages", "BYTES", [-1, -1])]
    assert (m.batching.max_batch_size, m.batching.max_queue_delay_ms) == (64, 1)
    assert m.options["top_k"] == 3 and m.options["max_top_k"] == 20
    assert m.options["embedder"] == "minilm-l6/1"

    embeddings = np.load(version.local_dir / "embeddings.npy")
    docs = [json.loads(line) for line in (version.local_dir / "docs.jsonl").read_text().splitlines()]
    assert embeddings.dtype == np.float32 and embeddings.shape == (len(docs), 384)
    assert m.metadata["doc_count"] == len(docs) >= 25
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert len({d["id"] for d in docs}) == len(docs)


# -- retrieval quality -------------------------------------------------------------------

@pytest.mark.parametrize("question", [
    "How do I reset my password?",
    "I forgot my password",
    "how can I change my password",
    "reset password",
])
def test_password_questions_rank_the_reset_article_first(index, embedder, question):
    ids, scores = search(index, embedder, question)
    assert ids[0] == "kb-password-reset"
    assert scores[0] > scores[1]


@pytest.mark.parametrize("question, expected", [
    ("Where is my order 1042?", "kb-order-tracking"),
    ("How long does shipping take?", "kb-shipping-times"),
    ("Can I cancel my order?", "kb-cancel-order"),
    ("My package arrived broken", "kb-damaged-item"),
    ("How do I delete my account?", "kb-account-deletion"),
    ("What are your support hours?", "kb-contact-support"),
    ("my card was declined", "kb-failed-payment"),
    ("Do you ship to Canada?", "kb-international-shipping"),
])
def test_other_questions_find_their_article(index, embedder, question, expected):
    ids, _ = search(index, embedder, question)
    assert ids[0] == expected


def test_outputs_shape_order_and_passages(index, embedder):
    result = index.run_batch([item(index, embedder.embed(["How do I reset my password?"]))])[0]
    ids, scores, passages = (result.outputs[k] for k in ("ids", "scores", "passages"))
    assert ids.shape == scores.shape == passages.shape == (1, 3)   # default top_k
    assert scores.dtype == np.float32
    assert list(scores[0]) == sorted(scores[0], reverse=True)
    assert passages[0, 0].startswith(b"How to reset your password: ")
    assert b"Forgot password" in passages[0, 0]


def test_query_is_normalised(index, embedder):
    vector = embedder.embed(["Where is my refund?"])
    a = index.run_batch([item(index, vector)])[0].outputs
    b = index.run_batch([item(index, vector * 37.5)])[0].outputs
    assert a["ids"].tolist() == b["ids"].tolist()
    np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-5)


def test_a_document_finds_itself(index):
    out = index.run_batch([item(index, index.embeddings[7:8], top_k=1)])[0].outputs
    assert out["ids"][0, 0] == index.ids[7]
    assert out["scores"][0, 0] == pytest.approx(1.0, abs=1e-5)


# -- parameters and validation -------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 5, 20, "4", np.int64(2)])
def test_top_k_in_range(index, embedder, k):
    ids, scores = search(index, embedder, "refund", top_k=k)
    assert len(ids) == len(scores) == int(k)


@pytest.mark.parametrize("k", [0, -1, 21, 1000, True, 2.5, "three", [3], float("nan")])
def test_top_k_out_of_range_is_invalid(index, embedder, k):
    with pytest.raises(InvalidInput) as err:
        item(index, embedder.embed(["refund"]), top_k=k)
    assert err.value.field == "top_k"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_embedding_is_invalid(index, bad):
    vector = np.ones((2, 384), dtype=np.float32)
    vector[1, 5] = bad
    with pytest.raises(InvalidInput) as err:
        item(index, vector)
    assert err.value.field == "embedding" and "row 1" in err.value.message


def test_zero_embedding_is_invalid(index):
    with pytest.raises(InvalidInput) as err:
        item(index, np.zeros((1, 384)))
    assert err.value.field == "embedding"


@pytest.mark.parametrize("shape", [(1, 100), (384,), (1, 384, 1)])
def test_wrong_shape_is_invalid(index, shape):
    with pytest.raises(InvalidInput) as err:
        item(index, np.ones(shape))
    assert err.value.field == "embedding"


def test_wrong_dtype_is_invalid(index):
    with pytest.raises(InvalidInput) as err:
        index.prepare({"embedding": np.ones((1, 384), dtype=np.float64)}, {})
    assert err.value.field == "embedding"


# -- batching ----------------------------------------------------------------------------

def test_mixed_top_k_in_one_batch(index, embedder):
    questions = ["How do I reset my password?", "shipping to Australia",
                 "I want a refund", "how do I use a gift card"]
    vectors = embedder.embed(questions)
    items = [item(index, vectors[0:1], top_k=1),
             item(index, vectors[1:3], top_k=7),       # a two-row request
             item(index, vectors[3:4])]                 # default top_k
    results = index.run_batch(items)
    assert len(results) == 3 and all(r.error is None for r in results)
    assert [r.outputs["ids"].shape for r in results] == [(1, 1), (2, 7), (1, 3)]
    # Each item's answer equals the one it gets when batched alone.
    for it, result in zip(items, results):
        alone = index.run_batch([it])[0].outputs
        assert alone["ids"].tolist() == result.outputs["ids"].tolist()
        np.testing.assert_allclose(alone["scores"], result.outputs["scores"], atol=1e-6)
    assert results[0].outputs["ids"][0, 0] == b"kb-password-reset"


# -- pure helpers ----------------------------------------------------------------------

def test_top_k_breaks_ties_by_index_and_caps_k():
    scores = np.array([[0.5, 0.9, 0.5, 0.1], [0.2, 0.2, 0.2, 0.2]], dtype=np.float32)
    idx, val = top_k(scores, 3)
    assert idx.tolist() == [[1, 0, 2], [0, 1, 2]]
    np.testing.assert_allclose(val, [[0.9, 0.5, 0.5], [0.2, 0.2, 0.2]])
    idx, _ = top_k(np.array([[0.5, 0.9, 0.5, 0.5, 0.5]]), 2)   # tie at the cut-off
    assert idx.tolist() == [[1, 0]]
    idx, _ = top_k(scores, 10)
    assert idx.shape == (2, 4)


def test_parse_top_k_default():
    assert parse_top_k(None, 3, 20) == 3
