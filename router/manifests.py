"""The model-store manifests the router needs (input specs for pipeline nodes,
metadata for models at zero replicas), read once per model variant. A model on an
external (oip) backend has no store entry: its manifest is built from the
server's ModelMetadata, asked through ``describe`` (the router core's)."""
from __future__ import annotations

import asyncio

from cmesh.config import MeshConfig
from cmesh.manifest import Manifest
from cmesh.store import ModelStore


def manifest_of_metadata(model: str, variant: str, answer) -> Manifest:
    """A manifest from an OIP ModelMetadataResponse (engine 'external')."""
    def specs(tensors):
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in tensors]

    return Manifest(name=model, version=variant, engine="external", platform=answer.platform or "external",
                    inputs=specs(answer.inputs), outputs=specs(answer.outputs))


class ManifestCache:
    def __init__(self, config: MeshConfig, describe=None) -> None:
        self.config = config
        self.store = ModelStore(config.store)
        self.describe = describe        # async (model, version) -> ModelMetadataResponse | None
        self._manifests: dict[tuple[str, str], Manifest] = {}

    def apply(self, config: MeshConfig) -> None:
        """Forget the manifests of variants whose source changed (or that are gone)."""
        if config.store != self.config.store:
            self.store, self._manifests = ModelStore(config.store), {}
        keep = {}
        for (model, variant), manifest in self._manifests.items():
            before, after = self.config.models.get(model), config.models.get(model)
            if before is not None and after is not None and before.external == after.external \
                    and before.variant_sources().get(variant) == after.variant_sources().get(variant):
                keep[(model, variant)] = manifest
        self.config, self._manifests = config, keep

    async def get(self, model: str, variant: str = "") -> Manifest:
        """The manifest of ``variant`` of ``model`` (its default variant when empty)."""
        cfg = self.config.models[model]
        variant = variant or cfg.default_variant()
        key = (model, variant)
        if key not in self._manifests and cfg.external:
            from cmesh.errors import Unavailable

            answer = await self.describe(model, variant) if self.describe is not None else None
            if answer is None:
                raise Unavailable(f"no endpoint of external backend {model!r} answered ModelMetadata",
                                  component=model)
            self._manifests[key] = manifest_of_metadata(model, variant, answer)
        if key not in self._manifests:
            source = cfg.variant_sources()[variant].source
            # The manifest only: on a remote store, open() would copy the whole model here.
            self._manifests[key] = await asyncio.to_thread(self.store.manifest, source)
        return self._manifests[key]
