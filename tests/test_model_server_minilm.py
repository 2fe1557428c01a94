"""A real model-server process on MiniLM (acceptance 2 and the bad-input cases)."""
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from cmesh.client import Client
from cmesh.errors import component_error_of
from meshtest import REPO, ServerProcess, write_config
from protos import inference_pb2 as pb

MAX_BATCH = 8
TEXTS = ["How do I reset my password?", "Where is my order 1042?",
         "The quick brown fox jumps over the lazy dog", "refund"]


@pytest.fixture(scope="module")
def server(demo_store, tmp_path_factory):
    cfg = write_config(tmp_path_factory.mktemp("cfg") / "mesh.yaml", {
        "store": str(demo_store),
        "server": {"max_message_bytes": 256 * 1024, "model_control": "explicit"},   # the repository API test
        "models": {"embedder": {"source": "store://minilm-l6/1",
                                "batching": {"max_batch_size": MAX_BATCH, "max_queue_delay_ms": 20},
                                "options": {"max_chars": 500}}}})
    proc = ServerProcess(cfg, ["embedder"])
    yield proc
    assert proc.stop() == 0


@pytest.fixture()
def client(server):
    with Client(server.address) as c:
        yield c


def texts(*values: str) -> dict:
    return {"text": np.array([v.encode() for v in values], dtype=object)}


def reference_embeddings(model_dir, values):
    """The same model computed directly with transformers, independent of our engine."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    enc = tok(values, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=1).numpy()


def test_tritonclient_health_metadata_and_embedding(server, demo_store, tmp_path) -> None:
    out = tmp_path / "probe.json"
    subprocess.run([sys.executable, str(REPO / "tests" / "triton_probe.py"), server.address, "embedder",
                    *TEXTS, "--out", str(out)], check=True, timeout=120)
    report = json.loads(out.read_text())
    assert report["live"] and report["ready"] and report["model_ready"]
    assert not report["unknown_model_ready"]
    assert report["metadata"]["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": ["-1"]}]
    assert report["metadata"]["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": ["-1", "384"]}]
    got = np.array(report["output"], dtype=np.float32)
    want = reference_embeddings(demo_store / "minilm-l6" / "1", TEXTS)
    cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert got.shape == (4, 384) and cosine.min() >= 0.999
    assert "cmesh-compute-ms" in report["parameters"]


def expect_error(fn, code: grpc.StatusCode, *fragments: str):
    with pytest.raises(grpc.RpcError) as info:
        fn()
    err = component_error_of(info.value)
    assert err.code == code, err
    for fragment in fragments:
        assert fragment in err.message, err.message
    return err


def test_bad_inputs_are_rejected_naming_the_input(client) -> None:
    wrong_type = {"text": np.zeros(1, dtype=np.float32)}
    err = expect_error(lambda: client.infer("embedder", wrong_type), grpc.StatusCode.INVALID_ARGUMENT,
                       "text:", "FP32", "BYTES")
    assert err.detail.field == "text" and err.detail.reason == "invalid_input"
    expect_error(lambda: client.infer("embedder", {"txt": texts("hi")["text"]}),
                 grpc.StatusCode.INVALID_ARGUMENT, "txt: unknown input")
    expect_error(lambda: client.infer("embedder", texts(*["ok"] * (MAX_BATCH + 1))),
                 grpc.StatusCode.INVALID_ARGUMENT, "text:", f"exceeds max_batch_size {MAX_BATCH}")
    expect_error(lambda: client.infer("embedder", {"text": np.array([[b"a"]], dtype=object)}),
                 grpc.StatusCode.INVALID_ARGUMENT, "text: shape [1, 1] does not match [-1]")
    expect_error(lambda: client.infer("embedder", texts("fine", "  ")),
                 grpc.StatusCode.INVALID_ARGUMENT, "text: element 1 is empty")
    expect_error(lambda: client.infer("embedder", texts("x" * 501)),
                 grpc.StatusCode.INVALID_ARGUMENT, "text: element 0 has 501 characters")
    expect_error(lambda: client.infer("embedder", {"text": np.array([b"\xff\xfe"], dtype=object)}),
                 grpc.StatusCode.INVALID_ARGUMENT, "text: element 0 is not valid UTF-8")
    expect_error(lambda: client.infer("embedder", texts("hi"), outputs=["vector"]),
                 grpc.StatusCode.INVALID_ARGUMENT, "vector: unknown output")
    err = expect_error(lambda: client.infer("no-such-model", texts("hi")), grpc.StatusCode.NOT_FOUND,
                       "no-such-model")
    assert err.detail.component == "no-such-model"
    expect_error(lambda: client.infer("embedder", texts("hi"), version="9"), grpc.StatusCode.NOT_FOUND,
                 "no version '9'")
    expect_error(lambda: client.infer("embedder", texts(*["y" * 300] * 1000)),
                 grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_shape_that_disagrees_with_data_and_missing_input(client) -> None:
    from cmesh import tensors

    req = pb.ModelInferRequest(model_name="embedder")
    req.inputs.add(name="text", datatype="BYTES", shape=[3])
    req.raw_input_contents.append(tensors.serialize_bytes(np.array([b"a", b"b"], dtype=object)))
    expect_error(lambda: client.stub.ModelInfer(req), grpc.StatusCode.INVALID_ARGUMENT,
                 "text: BYTES data of 10 bytes cannot hold the 3 elements")
    expect_error(lambda: client.stub.ModelInfer(pb.ModelInferRequest(model_name="embedder")),
                 grpc.StatusCode.INVALID_ARGUMENT, "text: required input is missing")


def test_bad_request_among_concurrent_good_ones_changes_nothing(client, server) -> None:
    solo = {t: client.infer("embedder", texts(t)).outputs["embedding"] for t in TEXTS}
    batches_before = server.metric("cmesh_model_batch_size_count", model="embedder")

    def call(i):
        if i % 4 == 3:          # a malformed request in the middle of the burst
            with pytest.raises(grpc.RpcError) as info:
                client.infer("embedder", texts(""))
            return info.value.code()
        text = TEXTS[i % len(TEXTS)]
        return text, client.infer("embedder", texts(text)).outputs["embedding"]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(32)))
    good = [r for r in results if isinstance(r, tuple)]
    assert len(good) == 24
    for text, emb in good:
        np.testing.assert_allclose(emb, solo[text], atol=1e-5)
    assert all(r == grpc.StatusCode.INVALID_ARGUMENT for r in results if not isinstance(r, tuple))
    batches = server.metric("cmesh_model_batch_size_count", model="embedder") - batches_before
    assert batches < 24, "24 concurrent good requests should have shared batches"


def test_unload_and_load_through_the_repository_api(client) -> None:
    index = client.stub.RepositoryIndex(pb.RepositoryIndexRequest())
    assert {m.name: m.state for m in index.models}["embedder"] == "READY"
    client.stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="embedder"))
    assert not client.ready("embedder")
    expect_error(lambda: client.infer("embedder", texts("hi")), grpc.StatusCode.UNAVAILABLE, "not loaded")
    client.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="embedder"))
    assert client.ready("embedder")
    assert client.infer("embedder", texts("hi")).outputs["embedding"].shape == (1, 384)


def test_metrics_and_cold_start_are_exposed(server) -> None:
    text = server.metrics()
    for name in ("cmesh_model_queue_depth", "cmesh_model_batch_size_bucket", "cmesh_model_compute_seconds",
                 "cmesh_model_requests_total", "cmesh_model_load_seconds", "cmesh_replica_cold_start_seconds"):
        assert name in text
    assert server.metric("cmesh_model_requests_total", model="embedder", status="INVALID_ARGUMENT") > 0
    assert server.metric("cmesh_replica_cold_start_seconds") > 0
    assert server.metric("cmesh_model_load_seconds", model="embedder", variant="default") > 0
    assert server.ready["cold_start_s"] > 0
