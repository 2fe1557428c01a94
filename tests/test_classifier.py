"""The intent classifier: featurizer, training recipe, artifact and serving engine."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from demo_store import classifier
from demo_store.base import BuildContext
from cmesh.errors import InvalidInput
from cmesh.manifest import parse_manifest
from model_server.engines import text_featurize as tf
from model_server.engines.base import EngineContext, engine_class
from model_server.engines.text_classifier import read_labels

FEATURIZE_PATH = Path(tf.__file__)


def texts(*values) -> dict[str, np.ndarray]:
    return {"text": np.array([v.encode() if isinstance(v, str) else v for v in values], dtype=object)}


# -- featurizer -----------------------------------------------------------------------

def test_featurize_is_deterministic_across_processes():
    sample = ["Where is my order 1042?", "I forgot my pässword", "don't cancel"]
    here = [tf.featurize(t, 1024) for t in sample]
    # Load the module by path in fresh interpreters with different hash seeds:
    # a salted hash() anywhere in the recipe would make these differ.
    script = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('tf', {str(FEATURIZE_PATH)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"print(json.dumps([m.featurize(t, 1024) for t in {sample!r}]))\n")
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"})
        assert json.loads(out.stdout) == here


def test_tokens_fold_digits_and_case():
    assert tf.tokenize("Where is my ORDER 1042?") == ["where", "is", "my", "order", "0"]
    assert tf.tokenize("What’s up") == ["what's", "up"]
    assert tf.featurize("order 1042") == tf.featurize("ORDER 88123")
    assert tf.featurize("order 1042") != tf.featurize("refund 1042")


def test_features_cover_words_bigrams_and_char_trigrams():
    feats = tf.feature_strings("reset pw")
    assert {"w:reset", "w:pw", "b:reset pw", "c:<re", "c:set", "c:et>", "c:<pw", "c:pw>"} <= set(feats)
    assert all(0 <= b < 64 for b in tf.featurize("reset pw", 64))
    assert tf.featurize("?!", 64) == []


def test_pack_builds_embedding_bag_offsets():
    ids, offsets = tf.pack([[1, 2], [], [3]])
    assert ids.tolist() == [1, 2, 3] and offsets.tolist() == [0, 2, 2]
    assert ids.dtype == offsets.dtype == np.int64
    ids, offsets = tf.pack([])
    assert ids.size == 0 and offsets.size == 0


# -- training recipe (pure parts) -------------------------------------------------------

def test_shipped_data_has_the_required_intents():
    examples = classifier.load_examples(Path(classifier.DATA_DIR) / classifier.DATA_FILE)
    counts: dict[str, int] = {}
    for _, label in examples:
        counts[label] = counts.get(label, 0) + 1
    assert len(counts) >= 8 and {"order_status", "password_reset"} <= set(counts)
    assert min(counts.values()) >= 45
    assert len({t.lower() for t, _ in examples}) == len(examples), "duplicate texts"


def test_load_examples_names_the_bad_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "hi", "label": "greeting"}\n{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2"):
        classifier.load_examples(path)


def test_stratified_split_is_seeded_disjoint_and_per_class():
    labels = ["a"] * 10 + ["b"] * 5 + ["c"] * 1
    train, held = classifier.stratified_split(labels, 0.2, seed=3)
    assert (train, held) == classifier.stratified_split(labels, 0.2, seed=3)
    assert not set(train) & set(held) and sorted(train + held) == list(range(16))
    assert [labels[i] for i in held].count("a") == 2
    assert [labels[i] for i in held].count("b") == 1
    assert [labels[i] for i in held].count("c") == 0   # a lone example stays in training


def test_evaluate_computes_accuracy_and_macro_f1():
    report = classifier.evaluate(["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "b"])
    assert report["accuracy"] == 0.75
    assert report["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": 0.6667, "support": 2}
    assert report["macro_f1"] == pytest.approx((0.6667 + 0.8) / 2)


def test_training_is_deterministic():
    rows = [tf.featurize(t, 256) for t in ["track my order", "reset password", "where is it", "forgot pw"]]
    config = classifier.TrainConfig(buckets=256, dim=8, epochs=3, batch_size=2)
    a = classifier.train(rows, [0, 1, 0, 1], 2, config).state_dict()
    b = classifier.train(rows, [0, 1, 0, 1], 2, config).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fingerprint_follows_the_data():
    (artifact,) = classifier.ARTIFACTS
    assert artifact.key == "intent-classifier/1"
    assert artifact.fingerprint.endswith(classifier.data_digest(classifier.DATA_DIR / classifier.DATA_FILE))


def test_read_labels_rejects_mismatches():
    assert read_labels('["a", "b"]', ["a", "b"], 2) == ["a", "b"]
    with pytest.raises(ValueError, match="options.labels"):
        read_labels('["a", "b"]', ["b", "a"], None)
    with pytest.raises(ValueError, match="3 columns"):
        read_labels('["a", "b"]', None, 3)
    with pytest.raises(ValueError, match="non-empty"):
        read_labels("[]", None, None)


# -- the built artifact and the engine --------------------------------------------------

@pytest.fixture(scope="session")
def built(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    out = store / "intent-classifier" / "1"
    out.mkdir(parents=True)
    lines: list[str] = []
    (artifact,) = classifier.ARTIFACTS
    artifact.build(out, BuildContext(store=store, progress=lines.append))
    return out, lines


@pytest.fixture(scope="session")
def engine(built):
    out, _ = built
    manifest = parse_manifest((out / "model.yaml").read_text())
    ctx = EngineContext(model="intent", variant="default", model_dir=out, manifest=manifest,
                        options=dict(manifest.options), max_batch_size=manifest.batching.max_batch_size)
    eng = engine_class("text-classifier")(ctx)
    eng.load()
    eng.warmup()
    return eng


def test_artifact_files_and_manifest(built):
    out, lines = built
    assert (out / "model.pt").is_file()
    labels = json.loads((out / "labels.json").read_text())
    manifest = parse_manifest((out / "model.yaml").read_text())
    assert manifest.engine == "text-classifier"
    assert [(t.name, t.datatype, t.shape) for t in manifest.inputs] == [("text", "BYTES", [-1])]
    assert [(t.name, t.datatype, t.shape) for t in manifest.outputs] == [
        ("label", "BYTES", [-1]), ("probabilities", "FP32", [-1, len(labels)]), ("confidence", "FP32", [-1])]
    assert manifest.batching.max_batch_size == 128 and manifest.batching.max_queue_delay_ms == 2
    assert manifest.options["max_chars"] == 2000 and manifest.options["labels"] == labels
    meta = manifest.metadata
    assert meta["held_out_accuracy"] >= 0.9
    assert 0 < meta["held_out_macro_f1"] <= 1
    assert set(meta["per_class"]) == set(labels)
    assert all(c["train"] > 0 and c["held_out"] > 0 for c in meta["per_class"].values())
    assert sum(c["held_out"] for c in meta["per_class"].values()) == meta["held_out_examples"]
    assert any("held-out accuracy" in line for line in lines)


def test_known_intents(engine):
    item = engine.prepare(texts("Where is my order 1042?", "How do I reset my password?"), {})
    (r,) = engine.run_batch([item])
    assert r.error is None
    assert r.outputs["label"].tolist() == [b"order_status", b"password_reset"]
    probs = r.outputs["probabilities"]
    assert probs.shape == (2, len(engine.labels)) and probs.dtype == np.float32
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.allclose(r.outputs["confidence"], probs.max(axis=1))


def test_batched_results_equal_solo_results(engine):
    requests = [texts("has order 2231 shipped yet"),
                texts("I forgot my password", "can i get a refund", "hello!"),
                texts("?!"),  # no features at all: still answered
                texts("Do you ship to Canada?", "x" * 2000)]
    items = [engine.prepare(r, {}) for r in requests]
    batched = engine.run_batch(items)
    assert len(batched) == len(items)
    for item, result in zip(items, batched):
        (solo,) = engine.run_batch([engine.prepare(item.inputs, {})])
        assert result.outputs["label"].tolist() == solo.outputs["label"].tolist()
        assert result.outputs["label"].shape == (item.rows,)
        np.testing.assert_allclose(result.outputs["probabilities"], solo.outputs["probabilities"],
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.outputs["confidence"], solo.outputs["confidence"],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value, message", [
    ("", "empty"),
    ("   ", "empty"),
    ("x" * 2001, "limit 2000"),
    (b"\xff\xfe bad", "UTF-8"),
])
def test_bad_text_is_invalid_input_naming_text(engine, value, message):
    with pytest.raises(InvalidInput, match=message) as err:
        engine.prepare(texts("fine", value), {})
    assert err.value.field == "text"


def test_wrong_datatype_and_missing_input_name_text(engine):
    with pytest.raises(InvalidInput) as err:
        engine.prepare({"text": np.array([1.0], dtype=np.float32)}, {})
    assert err.value.field == "text"
    with pytest.raises(InvalidInput) as err:
        engine.prepare({}, {})
    assert err.value.field == "text"


def test_prepare_counts_words(engine):
    item = engine.prepare(texts("track my package", "hi"), {})
    assert item.rows == 2 and item.input_tokens == 4
