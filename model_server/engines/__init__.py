"""Built-in engines. Importing this package registers each engine under its kind;
engines whose optional dependencies are missing (TensorRT) register nothing."""
from __future__ import annotations

import importlib
import logging

log = logging.getLogger(__name__)

_BUILTIN = (
    "hf_encoder",
    "hf_causal_lm",
    "text_classifier",
    "vector_index",
    "sql_sqlite",
    "torchscript",
    "tensorrt",
    "testing",
)

for _name in _BUILTIN:
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as exc:  # an engine module not present in this build
        if exc.name != f"{__name__}.{_name}":
            raise
        log.debug("engine module %s not available", _name)
