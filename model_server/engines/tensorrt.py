"""``tensorrt``: serve a serialized TensorRT engine (``model.plan``) on a CUDA GPU.

TensorRT 10 API: the plan is deserialized with ``trt.Runtime``; every I/O tensor
is bound by name (``set_input_shape`` / ``set_tensor_address``) to a torch CUDA
buffer, and ``execute_async_v3`` runs on a dedicated CUDA stream. The manifest's
inputs must be exactly the engine's inputs (TensorRT binds every input), its
outputs a subset of the engine's outputs. Request checks, grouping by shape and
per-item error isolation are shared with the ``torch`` engine (``TensorEngine``).

This module imports cleanly everywhere and touches neither TensorRT nor CUDA on
import. The first look-up of the ``tensorrt`` engine runs ``probe``: where
``tensorrt`` imports and CUDA is available the engine is registered; otherwise
the registry keeps the reason, and a model configured with ``engine: tensorrt``
fails to load with it.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np

from model_server.engines.base import register_if_available
from model_server.engines.torch_util import resolve_device
from model_server.engines.torchscript import (OutputContractError, TensorEngine, check_output, first_line,
                                              is_batchable, version_file)

KIND = "tensorrt"
DEFAULT_FILE = "model.plan"


def probe(import_module: Callable[[str], Any] = importlib.import_module,
          cuda_available: Callable[[], bool] | None = None) -> str | None:
    """Why the engine cannot run in this process, or None when it can."""
    try:
        import_module("tensorrt")
    except (ImportError, OSError) as exc:  # OSError: the wheel is there, libnvinfer is not
        return (f"the 'tensorrt' Python package cannot be imported ({first_line(exc)}); "
                "the tensorrt engine needs TensorRT 10 (pip install tensorrt) on a machine "
                "with an NVIDIA GPU")
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available
    if not cuda_available():
        return ("tensorrt imports but CUDA is not available (torch.cuda.is_available() is False); "
                "the tensorrt engine runs only on an NVIDIA GPU with a CUDA build of torch")
    return None


def torch_dtype(trt: Any, torch: Any, trt_dtype: Any) -> Any:
    """TensorRT tensor dtype -> torch dtype of the buffer bound to it."""
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16,
             "INT8": torch.int8, "UINT8": torch.uint8, "INT32": torch.int32,
             "INT64": torch.int64, "BOOL": torch.bool}
    for name, dtype in table.items():
        if getattr(trt.DataType, name, None) == trt_dtype:
            return dtype
    raise ValueError(f"TensorRT dtype {trt_dtype} has no torch buffer type here")


def check_io(manifest_inputs: list[Any], manifest_outputs: list[str],
             engine_inputs: list[str], engine_outputs: list[str]) -> None:
    """The manifest must describe the plan: same inputs, outputs it really has."""
    names = [spec.name for spec in manifest_inputs]
    if sorted(names) != sorted(engine_inputs):
        raise ValueError(f"manifest inputs {names} differ from the TensorRT engine's inputs "
                         f"{engine_inputs}")
    optional = [spec.name for spec in manifest_inputs if spec.optional]
    if optional:
        raise ValueError(f"inputs {optional} are marked optional, but a TensorRT engine binds every input")
    absent = [n for n in manifest_outputs if n not in engine_outputs]
    if absent:
        raise ValueError(f"manifest outputs {absent} are not outputs of the TensorRT engine "
                         f"(it has {engine_outputs})")


def chunks(rows: int, limit: int) -> list[tuple[int, int]]:
    """[start, end) row ranges of at most ``limit`` rows covering ``rows``."""
    return [(start, min(start + limit, rows)) for start in range(0, rows, max(limit, 1))]


class TensorRTEngine(TensorEngine):
    kind = KIND

    def load(self) -> None:
        import tensorrt as trt
        import torch

        self.check_numeric()
        if not self.ctx.device.startswith("cuda"):
            raise ValueError(f"engine 'tensorrt' runs on a CUDA device; set the model's "
                             f"resources.device to 'cuda' (it is {self.ctx.device!r})")
        self.device = torch.device(resolve_device(self.ctx.device))
        path = version_file(self.ctx.model_dir, str(self.ctx.option("file", DEFAULT_FILE)))
        self._trt, self._torch = trt, torch
        self._plan_bytes = path.stat().st_size
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self.runtime = trt.Runtime(self._logger)
            self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise RuntimeError(f"TensorRT could not deserialize {path.name}; a plan only loads with "
                                   "the TensorRT version and GPU it was built for")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(device=self.device)

        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._engine_outputs = [n for n in names if n not in inputs]
        check_io(self.inputs, [s.name for s in self.outputs], inputs, self._engine_outputs)
        self._dtypes = {n: torch_dtype(trt, torch, self.engine.get_tensor_dtype(n)) for n in names}
        self.batchable = is_batchable([*self.inputs, *self.outputs]) and all(
            self.engine.get_tensor_shape(n)[0] == -1 for n in inputs)
        self.max_rows = self._profile_max_rows(inputs) if self.batchable else 0
        self._out_dtypes = self.output_dtypes()

    def _profile_max_rows(self, inputs: list[str]) -> int:
        """Largest batch the engine's first optimization profile accepts; bigger
        batches run in chunks rather than failing."""
        limits = [int(self.engine.get_tensor_profile_shape(n, 0)[2][0]) for n in inputs]
        return min(limits) if limits else self.ctx.max_batch_size

    def forward(self, args_per_item: list[tuple[np.ndarray, ...]]) -> dict[str, np.ndarray]:
        arrays = self.concat(args_per_item)
        if not self.batchable:
            parts = [self._execute(arrays)]
        else:
            parts = [self._execute([a[start:end] for a in arrays])
                     for start, end in chunks(int(arrays[0].shape[0]), self.max_rows)]
        rows = int(arrays[0].shape[0]) if self.batchable else None
        out = {}
        for spec in self.outputs:
            array = parts[0][spec.name] if len(parts) == 1 else np.concatenate([p[spec.name] for p in parts])
            check_output(spec, array, rows)
            out[spec.name] = array
        return out

    def _execute(self, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
        """One TensorRT execution; buffers are torch CUDA tensors kept alive until the
        stream has finished with them."""
        torch, ctx = self._torch, self.context
        with torch.inference_mode(), torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            buffers = []
            for spec, array in zip(self.inputs, arrays):
                tensor = torch.from_numpy(array).to(self.device).to(self._dtypes[spec.name]).contiguous()
                if not ctx.set_input_shape(spec.name, tuple(tensor.shape)):
                    raise RuntimeError(f"input {spec.name!r} shape {list(tensor.shape)} is outside the "
                                       "TensorRT engine's optimization profile")
                ctx.set_tensor_address(spec.name, tensor.data_ptr())
                buffers.append(tensor)
            outputs = {}
            for name in self._engine_outputs:  # every output needs an address, wanted or not
                shape = tuple(ctx.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise OutputContractError(f"output {name!r} has a data-dependent shape {list(shape)}, "
                                              "which this engine does not support")
                tensor = torch.empty(shape, dtype=self._dtypes[name], device=self.device)
                ctx.set_tensor_address(name, tensor.data_ptr())
                outputs[name] = tensor
            if not ctx.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed (see the TensorRT log)")
            self.stream.synchronize()
            return {spec.name: outputs[spec.name].to(device="cpu", dtype=dtype).numpy()
                    for spec, dtype in zip(self.outputs, self._out_dtypes)}

    def memory_bytes(self) -> int:
        engine = getattr(self, "engine", None)
        if engine is None:
            return super().memory_bytes()
        # device_memory_size_v2 since TensorRT 10.1; the old name is gone in 11
        device_mem = getattr(engine, "device_memory_size_v2", None)
        if device_mem is None:
            device_mem = engine.device_memory_size
        return max(super().memory_bytes(), int(device_mem) + self._plan_bytes)

    def unload(self) -> None:
        self.context = None
        self.engine = None
        self.runtime = None
        if getattr(self, "_torch", None) is not None:
            self._torch.cuda.empty_cache()


# Probed on first use: asking torch about CUDA initialises the driver, and the
# replica fork server imports every engine module before it forks.
register_if_available(TensorRTEngine, probe)
