"""The model-store manifests the router needs (input specs for pipeline nodes,
metadata for models at zero replicas), read once per model variant."""
from __future__ import annotations

import asyncio

from cmesh.config import MeshConfig
from cmesh.manifest import Manifest
from cmesh.store import ModelStore


class ManifestCache:
    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self.store = ModelStore(config.store)
        self._manifests: dict[tuple[str, str], Manifest] = {}

    async def get(self, model: str, variant: str = "") -> Manifest:
        """The manifest of ``variant`` of ``model`` (its default variant when empty)."""
        cfg = self.config.models[model]
        variant = variant or cfg.default_variant()
        key = (model, variant)
        if key not in self._manifests:
            source = cfg.variant_sources()[variant].source
            self._manifests[key] = (await asyncio.to_thread(self.store.open, source)).manifest
        return self._manifests[key]
