"""The ``tensorrt`` engine: clean absence everywhere, a real run where a GPU and
TensorRT exist (skipped, with the reason, elsewhere)."""
from __future__ import annotations

import importlib
import io
from pathlib import Path

import numpy as np
import pytest

from cmesh.manifest import Manifest, TensorSpec, dump_manifest, parse_manifest
from model_server.engines import base
from model_server.engines.base import EngineContext, engine_class

IN_FEATURES, OUT_FEATURES = 4, 3


# -- runs everywhere ------------------------------------------------------------------------

def test_module_imports_and_says_why_it_is_unavailable():
    trt_engine = importlib.import_module("model_server.engines.tensorrt")
    reason = trt_engine.probe()
    if reason is None:
        assert engine_class("tensorrt") is trt_engine.TensorRTEngine
        return
    with pytest.raises(ValueError) as err:
        engine_class("tensorrt")
    message = str(err.value)
    assert "not available here" in message and reason in message
    assert "unknown engine" not in message
    assert "tensorrt" not in base._REGISTRY


def test_optional_engines_are_probed_on_first_use_only(monkeypatch):
    """Importing the engines must not probe (the fork server imports them before
    forking, and a CUDA probe then would break CUDA in every replica)."""
    probes = []

    class Optional(base.Engine):
        kind = "optional-test"

    for table in ("_REGISTRY", "_UNAVAILABLE", "_DEFERRED"):     # a scratch registry
        monkeypatch.setattr(base, table, dict(getattr(base, table)))
    base.register_if_available(Optional, lambda: probes.append(1) or "no accelerator here")
    assert probes == []
    for _ in range(2):
        with pytest.raises(ValueError, match="not available here: no accelerator here"):
            engine_class("optional-test")
    assert probes == [1]                           # once, then remembered

    base._UNAVAILABLE.clear()
    base.register_if_available(Optional, lambda: None)
    assert engine_class("optional-test") is Optional


def test_probe_names_the_missing_piece():
    from model_server.engines.tensorrt import probe

    def no_module(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    reason = probe(import_module=no_module)
    assert "'tensorrt' Python package cannot be imported" in reason and "NVIDIA GPU" in reason
    reason = probe(import_module=lambda name: object(), cuda_available=lambda: False)
    assert "CUDA is not available" in reason
    assert probe(import_module=lambda name: object(), cuda_available=lambda: True) is None


def test_check_io_and_chunks():
    from model_server.engines.tensorrt import check_io, chunks

    x = TensorSpec(name="x", datatype="FP32", shape=[-1, 4])
    check_io([x], ["y"], ["x"], ["y", "aux"])
    with pytest.raises(ValueError, match="differ"):
        check_io([x], ["y"], ["x", "mask"], ["y"])
    with pytest.raises(ValueError, match="not outputs"):
        check_io([x], ["z"], ["x"], ["y"])
    with pytest.raises(ValueError, match="optional"):
        check_io([TensorSpec(name="x", datatype="FP32", shape=[-1], optional=True)], ["y"], ["x"], ["y"])
    assert chunks(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert chunks(2, 8) == [(0, 2)]


# -- needs an NVIDIA GPU and TensorRT --------------------------------------------------------

@pytest.fixture(scope="module")
def trt():
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (needs an NVIDIA GPU machine)")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available; the TensorRT engine runs only on an NVIDIA GPU")
    return trt


def build_plan(trt, weight: np.ndarray, bias: np.ndarray) -> bytes:
    """A serialized engine for y = x @ weight + bias with a dynamic batch (1..16):
    from an ONNX export of the torch module when the onnx package is present,
    else written with TensorRT's network API."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    keep = []  # weights must outlive the build
    try:
        import onnx  # noqa: F401  (torch's ONNX exporter needs it)
        import torch

        linear = torch.nn.Linear(IN_FEATURES, OUT_FEATURES)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(weight.T.copy()))
            linear.bias.copy_(torch.from_numpy(bias))
        buf = io.BytesIO()
        torch.onnx.export(linear, (torch.zeros(2, IN_FEATURES),), buf, dynamo=False,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(buf.getvalue()):
            raise RuntimeError("; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    except ImportError:
        x = network.add_input("x", trt.float32, (-1, IN_FEATURES))
        w = np.ascontiguousarray(weight, dtype=np.float32)
        b = np.ascontiguousarray(bias.reshape(1, OUT_FEATURES), dtype=np.float32)
        keep += [w, b]
        w_layer = network.add_constant(w.shape, trt.Weights(w))
        b_layer = network.add_constant(b.shape, trt.Weights(b))
        mm = network.add_matrix_multiply(x, trt.MatrixOperation.NONE,
                                         w_layer.get_output(0), trt.MatrixOperation.NONE)
        y = network.add_elementwise(mm.get_output(0), b_layer.get_output(0),
                                    trt.ElementWiseOperation.SUM).get_output(0)
        y.name = "y"
        network.mark_output(y)
    config = builder.create_builder_config()
    config.clear_flag(trt.BuilderFlag.TF32)  # exact FP32, so results compare tightly
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, IN_FEATURES), (4, IN_FEATURES), (16, IN_FEATURES))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None, "TensorRT failed to build the test engine"
    return bytes(plan)


@pytest.mark.gpu
def test_tiny_linear_engine_runs_on_the_gpu(trt, tmp_path: Path):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((IN_FEATURES, OUT_FEATURES)).astype(np.float32)
    bias = rng.standard_normal(OUT_FEATURES).astype(np.float32)
    (tmp_path / "model.plan").write_bytes(build_plan(trt, weight, bias))
    manifest = Manifest(name="tiny-trt", version="1", engine="tensorrt", platform="tensorrt",
                        inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, IN_FEATURES]}],
                        outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, OUT_FEATURES]}],
                        batching={"max_batch_size": 32})
    (tmp_path / "model.yaml").write_text(dump_manifest(manifest))
    manifest = parse_manifest((tmp_path / "model.yaml").read_text())
    ctx = EngineContext(model="tiny-trt", variant="default", model_dir=tmp_path, manifest=manifest,
                        device="cuda", options=dict(manifest.options), max_batch_size=32)
    engine = engine_class("tensorrt")(ctx)
    engine.load()
    try:
        assert engine.max_rows == 16
        engine.warmup()  # 1 and 32 rows: 32 runs as two chunks of the profile's 16
        arrays = [rng.standard_normal((n, IN_FEATURES)).astype(np.float32) for n in (1, 3, 20)]
        results = engine.run_batch([engine.prepare({"x": a}, {}) for a in arrays])
        assert len(results) == 3
        for a, result in zip(arrays, results):
            assert result.error is None
            np.testing.assert_allclose(result.outputs["y"], a @ weight + bias, rtol=1e-4, atol=1e-4)
        assert engine.memory_bytes() > 0
    finally:
        engine.unload()
