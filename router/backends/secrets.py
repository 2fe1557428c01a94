"""External backends' credentials, read from the environment at the entry point
(``python -m router``) and passed down by model; never read at import."""
from __future__ import annotations

from collections.abc import Mapping

from cmesh.config import MeshConfig
from cmesh.errors import InvalidInput
from router.backends.oip import backend_specs


def secrets_from_env(config: MeshConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """By model: an oip backend's ``credential.env``, an openai backend's
    ``api_key_env``. A named variable that is unset is a start-up error."""
    wanted = {model: (f"models.{model}.backend.credential.env", spec.credential.env)
              for model, spec in backend_specs(config).items() if spec.credential is not None}
    for model, cfg in config.models.items():
        if cfg.backend.kind == "openai" and cfg.backend.api_key_env:
            wanted[model] = (f"models.{model}.backend.api_key_env", cfg.backend.api_key_env)
    secrets = {}
    for model, (path, name) in wanted.items():
        value = environ.get(name)
        if not value:
            raise InvalidInput(path, f"environment variable {name} is not set")
        secrets[model] = value
    return secrets
