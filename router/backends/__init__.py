"""Backends of the router core: one interface (``base.Backend``), one adapter per
kind (``mesh``, ``oip``, ``openai``), and ``RouterBackends``, which picks the
adapter for a leased endpoint from the model's ``backend:`` config."""
from __future__ import annotations

import asyncio

from cmesh.config import MeshConfig
from cmesh.internal_auth import MeshCredentials
from router.backends.base import Backend, BackendError, Backends
from router.backends.mesh import MeshBackends
from router.backends.oip import OipBackend, backend_specs
from router.backends.openai_http import OpenAIBackend

__all__ = ["Backend", "BackendError", "Backends", "RouterBackends"]


class RouterBackends:
    """The production ``Backends``: mesh replicas over the model's data path, oip
    and openai endpoints through their adapters. ``secrets``: external backends'
    credentials by model (read from the environment at the entry point,
    ``secrets.secrets_from_env``)."""

    def __init__(self, config: MeshConfig, credentials: MeshCredentials | None = None,
                 secrets: dict[str, str] | None = None) -> None:
        self.config = config
        self.mesh = MeshBackends(credentials)
        self.secrets = secrets or {}
        self._oip_specs = backend_specs(config)
        self._externals: dict[tuple[str, str], OipBackend | OpenAIBackend] = {}
        self._cache: dict[tuple[str, str], Backend] = {}

    def apply(self, config: MeshConfig) -> None:
        """An applied config: adapters of models whose backend changed are rebuilt on
        their next call (mesh channels are per address and stay)."""
        changed = {m for m in set(self.config.models) | set(config.models)
                   if (self.config.models.get(m) and self.config.models[m].backend)
                   != (config.models.get(m) and config.models[m].backend)}
        if config.router.data_path != self.config.router.data_path:
            changed |= set(config.models)
        self.config, self._oip_specs = config, backend_specs(config)
        self._cache = {k: b for k, b in self._cache.items() if k[0] not in changed}
        loop = asyncio.get_running_loop()
        for key in [k for k in self._externals if k[0] in changed]:
            loop.create_task(self._externals.pop(key).close(graceful=True))   # in flight finishes

    def get(self, model: str, replica) -> Backend:
        key = (model, replica.address)
        backend = self._cache.get(key)
        if backend is None:
            kind = getattr(replica, "kind", "mesh")
            if kind in ("oip", "openai"):
                backend = self._externals.get(key)
                if backend is None:
                    backend = self._externals[key] = self._open_external(kind, model, replica.address)
            else:
                path = self.config.models[model].backend.data_path or self.config.router.data_path
                backend = self.mesh.get(path, replica.address)
            self._cache[key] = backend
        return backend

    def _open_external(self, kind: str, model: str, address: str) -> OipBackend | OpenAIBackend:
        if kind == "oip":
            return OipBackend(address, model, self._oip_specs[model], self.secrets.get(model))
        cfg = self.config.models[model]
        return OpenAIBackend(address, model, cfg.backend, self.secrets.get(model),
                             cfg.backend.max_inflight_per_endpoint or cfg.deployment.max_inflight_per_replica)

    def retire(self, live: set[str]) -> None:
        self._cache = {k: b for k, b in self._cache.items() if k[1] in live}
        gone = self.mesh.retire(live)
        for key in [k for k in self._externals if k[1] not in live]:
            gone.append(self._externals.pop(key))
        loop = asyncio.get_running_loop()
        for backend in gone:
            # The endpoint left the table (draining): finish what is in flight, then close.
            loop.create_task(backend.close(graceful=True))

    async def close(self) -> None:
        for backend in [*self.mesh.all(), *self._externals.values()]:
            await backend.close()
        self._cache.clear()
