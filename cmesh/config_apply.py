"""Configs that arrive as text (an apply over the wire, a reload): parsed with
every problem reported at once, the entry point's flags applied on top as they
were to the file, and the refusal an operator sees. Shared by the autoscaler
(which validates and records applies) and routers (which follow them)."""
from __future__ import annotations

from collections.abc import Mapping

from cmesh.config import MeshConfig, parse_config, with_overrides
from cmesh.config_diff import removal_problems
from cmesh.errors import InvalidInput
from cmesh.validation import ConfigError, load_plain_yaml

SOURCE = "applied config"
# Paths a running service cannot change: listeners, channels, state, credentials.
RESTART_ONLY = ("redis_url", "router.autoscaler", "autoscaler.listen", "autoscaler.provider", "security",
                "observability", "server.max_message_bytes", "autoscaler.kubernetes")


def restart_only(path: str) -> bool:
    return any(path == p or path.startswith(p + ".") for p in RESTART_ONLY)


def parse_text(text: str, in_force: MeshConfig | None, overrides: Mapping[str, object]) -> MeshConfig:
    """A config from YAML text, with every problem at once: YAML, references a
    removal breaks (naming the model and who still uses it), schema."""
    data = load_plain_yaml(text, SOURCE)
    problems = removal_problems(in_force, data) if in_force is not None and isinstance(data, Mapping) else []
    try:
        config = parse_config(data, SOURCE)
    except ConfigError as exc:
        raise ConfigError(SOURCE, problems + [e for e in exc.errors if e not in problems]) from None
    if problems:
        raise ConfigError(SOURCE, problems)
    return with_overrides(config, dict(overrides))


def refusal(exc: ConfigError) -> InvalidInput:
    n = len(exc.errors)
    return InvalidInput("yaml", f"config refused, nothing changed ({n} error{'s' if n != 1 else ''}):\n  "
                                + "\n  ".join(exc.errors))
