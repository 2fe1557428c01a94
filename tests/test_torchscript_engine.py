"""The generic ``torch`` engine, against tiny TorchScript modules written per test."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cmesh.errors import Internal, InvalidInput
from cmesh.manifest import Manifest, dump_manifest, parse_manifest
from model_server.engines.base import EngineContext, engine_class
from model_server.engines.torchscript import (group_items, output_values, positional_args, quiet_jit,
                                              split_rows)

W = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
B = np.array([0.5, -1.0, 2.0], dtype=np.float32)


class Affine(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.from_numpy(W.copy()))
        self.b = torch.nn.Parameter(torch.from_numpy(B.copy()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w + self.b


class TwoOutputs(torch.nn.Module):
    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = x * scale
        return y, y.sum(dim=1)


class DictOutputs(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"double": x * 2, "plus_one": x + 1}


class Doubler(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class OptionalBias(torch.nn.Module):
    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if bias is None:
            return x
        return x + bias


class DropsRows(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:1]


def tensor(name: str, datatype: str, shape: list[int], **kw) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape, **kw}


def make_engine(tmp_path: Path, module: torch.nn.Module, inputs: list[dict], outputs: list[dict],
                file: str = "model.pt", max_batch_size: int = 16, load: bool = True, **options):
    with quiet_jit():
        torch.jit.script(module).save(str(tmp_path / file))
    manifest = Manifest(name="tiny", version="1", engine="torch", inputs=inputs, outputs=outputs,
                        batching={"max_batch_size": max_batch_size}, options=options)
    (tmp_path / "model.yaml").write_text(dump_manifest(manifest))
    manifest = parse_manifest((tmp_path / "model.yaml").read_text())
    ctx = EngineContext(model="tiny", variant="default", model_dir=tmp_path, manifest=manifest,
                        options=dict(manifest.options), max_batch_size=max_batch_size)
    engine = engine_class("torch")(ctx)
    if load:
        engine.load()
    return engine


@pytest.fixture
def affine(tmp_path):
    engine = make_engine(tmp_path, Affine(), [tensor("x", "FP32", [-1, 4])], [tensor("y", "FP32", [-1, 3])])
    engine.warmup()
    return engine


def x_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


def test_affine_matches_numpy(affine):
    x = x_rows(3, 0)
    (result,) = affine.run_batch([affine.prepare({"x": x}, {})])
    assert result.error is None
    assert result.outputs["y"].dtype == np.float32 and result.outputs["y"].shape == (3, 3)
    np.testing.assert_allclose(result.outputs["y"], x @ W + B, rtol=1e-5, atol=1e-6)


def test_batched_results_equal_solo_results(affine):
    arrays = [x_rows(n, seed) for seed, n in enumerate((1, 4, 2))]
    items = [affine.prepare({"x": a}, {}) for a in arrays]
    results = affine.run_batch(items)
    assert len(results) == 3
    for a, result in zip(arrays, results):
        (solo,) = affine.run_batch([affine.prepare({"x": a}, {})])
        assert result.outputs["y"].shape == (len(a), 3)
        np.testing.assert_allclose(result.outputs["y"], solo.outputs["y"], rtol=1e-5, atol=1e-6)


def test_read_only_wire_arrays_are_accepted(affine):
    x = np.frombuffer(x_rows(2, 1).tobytes(), dtype=np.float32).reshape(2, 4)
    (result,) = affine.run_batch([affine.prepare({"x": x}, {})])
    np.testing.assert_allclose(result.outputs["y"], x @ W + B, rtol=1e-5, atol=1e-6)


def test_request_checks_name_the_input(affine):
    with pytest.raises(InvalidInput) as err:
        affine.prepare({"x": np.zeros((1, 5), np.float32)}, {})
    assert err.value.field == "x"
    with pytest.raises(InvalidInput) as err:
        affine.prepare({"x": np.zeros((1, 4), np.float64)}, {})
    assert err.value.field == "x"
    with pytest.raises(InvalidInput) as err:
        affine.prepare({"x": np.zeros((17, 4), np.float32)}, {})
    assert "max_batch_size" in str(err.value)


def test_items_of_other_shapes_run_separately(tmp_path):
    engine = make_engine(tmp_path, Doubler(), [tensor("x", "FP32", [-1, -1])],
                         [tensor("y", "FP32", [-1, -1])])
    engine.warmup()  # variable non-batch dim: skipped, must not fail
    arrays = [np.ones((2, 3), np.float32), np.ones((1, 5), np.float32), np.full((1, 3), 4, np.float32)]
    results = engine.run_batch([engine.prepare({"x": a}, {}) for a in arrays])
    for a, result in zip(arrays, results):
        np.testing.assert_array_equal(result.outputs["y"], a * 2)


def test_a_rejected_item_does_not_fail_its_neighbours(tmp_path):
    # The manifest allows any width; the weights only take 4, so width 5 fails in the model.
    engine = make_engine(tmp_path, Affine(), [tensor("x", "FP32", [-1, -1])], [tensor("y", "FP32", [-1, 3])])
    good, bad = x_rows(2, 3), np.ones((1, 5), np.float32)
    results = engine.run_batch([engine.prepare({"x": good}, {}), engine.prepare({"x": bad}, {}),
                                engine.prepare({"x": good}, {})])
    assert results[0].error is None and results[2].error is None
    np.testing.assert_allclose(results[2].outputs["y"], good @ W + B, rtol=1e-5, atol=1e-6)
    assert isinstance(results[1].error, InvalidInput) and results[1].error.field == "x"


def test_tuple_outputs_map_in_manifest_order(tmp_path):
    engine = make_engine(tmp_path, TwoOutputs(),
                         [tensor("x", "FP32", [-1, 2]), tensor("scale", "FP32", [-1, 1])],
                         [tensor("scaled", "FP32", [-1, 2]), tensor("total", "FP64", [-1])])
    engine.warmup()
    x = np.array([[1, 2], [3, 4]], np.float32)
    scale = np.array([[2], [10]], np.float32)
    (result,) = engine.run_batch([engine.prepare({"x": x, "scale": scale}, {})])
    np.testing.assert_array_equal(result.outputs["scaled"], x * scale)
    assert result.outputs["total"].dtype == np.float64  # cast to the manifest's datatype
    np.testing.assert_array_equal(result.outputs["total"], [6.0, 70.0])


def test_dict_outputs_map_by_name(tmp_path):
    engine = make_engine(tmp_path, DictOutputs(), [tensor("x", "INT64", [-1, 2])],
                         [tensor("plus_one", "INT32", [-1, 2]), tensor("double", "INT64", [-1, 2])])
    x = np.array([[1, 2]], np.int64)
    (result,) = engine.run_batch([engine.prepare({"x": x}, {})])
    assert result.outputs["plus_one"].dtype == np.int32
    assert result.outputs["plus_one"].tolist() == [[2, 3]] and result.outputs["double"].tolist() == [[2, 4]]


def test_trailing_optional_input_may_be_left_out(tmp_path):
    engine = make_engine(tmp_path, OptionalBias(),
                         [tensor("x", "FP32", [-1, 2]), tensor("bias", "FP32", [-1, 2], optional=True)],
                         [tensor("y", "FP32", [-1, 2])])
    x = np.ones((1, 2), np.float32)
    with_bias = engine.prepare({"x": x, "bias": np.full((1, 2), 3, np.float32)}, {})
    without = engine.prepare({"x": x}, {})
    results = engine.run_batch([with_bias, without])
    assert results[0].outputs["y"].tolist() == [[4, 4]] and results[1].outputs["y"].tolist() == [[1, 1]]


def test_positional_args_cannot_skip_an_optional_input():
    specs = parse_manifest(dump_manifest(Manifest(
        name="m", version="1", engine="torch",
        inputs=[tensor("a", "FP32", [-1]), tensor("b", "FP32", [-1], optional=True),
                tensor("c", "FP32", [-1])],
        outputs=[tensor("y", "FP32", [-1])]))).inputs
    with pytest.raises(InvalidInput) as err:
        positional_args(specs, {"a": np.zeros(1, np.float32), "c": np.zeros(1, np.float32)})
    assert err.value.field == "b"


def test_output_contract_violations_are_internal_errors(tmp_path):
    engine = make_engine(tmp_path, DropsRows(), [tensor("x", "FP32", [-1, 2])],
                         [tensor("y", "FP32", [-1, 2])])
    results = engine.run_batch([engine.prepare({"x": np.ones((3, 2), np.float32)}, {})])
    assert isinstance(results[0].error, Internal) and "rows" in results[0].error.message


def test_wrong_output_count_is_an_internal_error(tmp_path):
    engine = make_engine(tmp_path, Doubler(), [tensor("x", "FP32", [-1, 2])],
                         [tensor("y", "FP32", [-1, 2]), tensor("z", "FP32", [-1, 2])])
    (result,) = engine.run_batch([engine.prepare({"x": np.ones((1, 2), np.float32)}, {})])
    assert isinstance(result.error, Internal) and "2 outputs" in result.error.message


def test_options_file_and_its_bounds(tmp_path):
    engine = make_engine(tmp_path, Doubler(), [tensor("x", "FP32", [-1, 2])], [tensor("y", "FP32", [-1, 2])],
                         file="custom.pt", load=False)
    with pytest.raises(FileNotFoundError, match="model.pt"):
        engine.load()
    engine.ctx.options["file"] = "../outside.pt"
    with pytest.raises(ValueError, match="inside the version directory"):
        engine.load()
    engine.ctx.options["file"] = "custom.pt"
    engine.load()
    (result,) = engine.run_batch([engine.prepare({"x": np.ones((1, 2), np.float32)}, {})])
    assert result.outputs["y"].tolist() == [[2, 2]]


def test_bytes_tensors_are_refused_at_load(tmp_path):
    engine = make_engine(tmp_path, Doubler(), [tensor("x", "BYTES", [-1])], [tensor("y", "FP32", [-1])],
                         load=False)
    with pytest.raises(ValueError, match="BYTES"):
        engine.load()


def test_unbatched_model_runs_item_by_item(tmp_path):
    engine = make_engine(tmp_path, Affine(), [tensor("x", "FP32", [2, 4])], [tensor("y", "FP32", [2, 3])])
    engine.warmup()
    arrays = [x_rows(2, 5), x_rows(2, 6)]
    results = engine.run_batch([engine.prepare({"x": a}, {}) for a in arrays])
    for a, result in zip(arrays, results):
        np.testing.assert_allclose(result.outputs["y"], a @ W + B, rtol=1e-5, atol=1e-6)


# -- pure helpers ------------------------------------------------------------------------

def test_group_items_keeps_arrival_order():
    a = (np.zeros((1, 3), np.float32),)
    b = (np.zeros((2, 5), np.float32),)
    c = (np.zeros((4, 3), np.float32),)
    d = (np.zeros((1, 3), np.float64),)
    assert group_items([a, b, c, d]) == [[0, 2], [1], [3]]
    assert group_items([a, c], batchable=False) == [[0], [1]]


def test_split_rows_cuts_by_item_rows():
    parts = split_rows({"y": np.arange(6)}, [1, 3, 2])
    assert [p["y"].tolist() for p in parts] == [[0], [1, 2, 3], [4, 5]]


def test_output_values_shapes():
    specs = parse_manifest(dump_manifest(Manifest(
        name="m", version="1", engine="torch", inputs=[tensor("x", "FP32", [-1])],
        outputs=[tensor("a", "FP32", [-1]), tensor("b", "FP32", [-1])]))).outputs
    assert output_values((1, 2), specs) == [1, 2]
    assert output_values({"b": 2, "a": 1, "extra": 3}, specs) == [1, 2]
    with pytest.raises(ValueError, match="without outputs"):
        output_values({"a": 1}, specs)
    with pytest.raises(ValueError, match="one value"):
        output_values(1, specs)
