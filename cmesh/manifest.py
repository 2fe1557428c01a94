"""The ``model.yaml`` manifest in every model-store version directory."""
from __future__ import annotations

from typing import Any

import yaml
from pydantic import Field, field_validator

from cmesh.tensors import DTYPES
from cmesh.validation import Strict, load_yaml, validate_mapping

MANIFEST_FILE = "model.yaml"


class TensorSpec(Strict):
    """One input or output tensor. ``shape`` includes the batch dimension (-1)
    first when the model is batched; -1 marks any variable dimension."""

    name: str = Field(min_length=1)
    datatype: str
    shape: list[int] = Field(min_length=1)
    optional: bool = False
    description: str = ""

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, v: str) -> str:
        if v not in DTYPES:
            raise ValueError(f"must be one of {sorted(DTYPES)}")
        return v

    @field_validator("shape")
    @classmethod
    def _dims(cls, v: list[int]) -> list[int]:
        if any(d < -1 or d == 0 for d in v):
            raise ValueError("dimensions must be positive or -1")
        return v


class ManifestBatching(Strict):
    """Defaults; mesh.yaml's per-model ``batching`` overrides them."""

    max_batch_size: int = Field(8, ge=1)
    max_queue_delay_ms: float = Field(4.0, ge=0)


class Manifest(Strict):
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    engine: str = Field(min_length=1)
    platform: str = "pytorch"
    description: str = ""
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    batching: ManifestBatching = ManifestBatching()
    memory_mb: int = Field(64, ge=1, description="resident memory estimate used for placement")
    options: dict[str, Any] = {}
    metadata: dict[str, Any] = {}

    @field_validator("version", mode="before")
    @classmethod
    def _version_str(cls, v: Any) -> str:
        return str(v)

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)


def parse_manifest(text: str, source: str = MANIFEST_FILE) -> Manifest:
    return validate_mapping(Manifest, load_yaml(text, source), source, not_mapping="must be a mapping")


def dump_manifest(manifest: Manifest) -> str:
    return yaml.safe_dump(manifest.model_dump(mode="json", exclude_defaults=False), sort_keys=False)
