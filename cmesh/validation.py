"""Turn pydantic validation errors into messages that name the path and the rule,
and read YAML documents into validated classes with such messages."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Base for config classes: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=False, populate_by_name=True)


class ConfigError(ValueError):
    """Invalid configuration; ``errors`` holds one 'path: rule' line per problem."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        super().__init__(f"invalid {source}:\n  " + "\n  ".join(errors))


def _n(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


_RULES = {
    "greater_than_equal": lambda c: f"must be >= {_n(c['ge'])}",
    "greater_than": lambda c: f"must be > {_n(c['gt'])}",
    "less_than_equal": lambda c: f"must be <= {_n(c['le'])}",
    "less_than": lambda c: f"must be < {_n(c['lt'])}",
    "missing": lambda c: "is required",
    "extra_forbidden": lambda c: "unknown field",
    "literal_error": lambda c: f"must be one of {c.get('expected', '')}",
    "string_pattern_mismatch": lambda c: f"must match {c.get('pattern', '')}",
}


def format_errors(exc: ValidationError, prefix: str = "") -> list[str]:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
        ctx = err.get("ctx") or {}
        rule = _RULES.get(err["type"])
        if rule is not None:
            message = rule(ctx)
        else:
            message = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        # Cross-field checks report "sub.path: rule", one problem a line; join each
        # onto the location.
        for problem in message.split("\n") if err["type"] == "value_error" else [message]:
            where = list(loc)
            if err["type"] == "value_error" and ": " in problem and not problem.startswith(" "):
                sub, _, problem = problem.partition(": ")
                where.extend(sub.split("."))
            path = ".".join(([prefix] if prefix else []) + where)
            lines.append(f"{path}: {problem}" if path else problem)
    return lines


def read_text(path: str | Path, error: type[ConfigError] = ConfigError) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise error(str(path), [f"cannot read: {exc.strerror}"]) from None


def load_yaml(text: str, source: str, error: type[ConfigError] = ConfigError) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(source, [f"not valid YAML: {exc}"]) from None


MAX_CONFIG_BYTES = 1 << 20


class _PlainLoader(yaml.SafeLoader):
    """Safe YAML without anchors and aliases: a config sent over the wire cannot
    make its reader walk an exponential graph ("billion laughs")."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(f"aliases are not allowed (line {mark.line + 1})")
        return super().compose_node(parent, index)


def load_plain_yaml(text: str, source: str, error: type[ConfigError] = ConfigError) -> Any:
    """YAML text that arrived over the wire: bounded in size, no aliases."""
    if len(text) > MAX_CONFIG_BYTES:
        raise error(source, [f"too large: {len(text)} characters, at most {MAX_CONFIG_BYTES}"])
    try:
        return yaml.load(text, Loader=_PlainLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise error(source, [f"not valid YAML: {exc}"]) from None


def validate_mapping(model: type[M], data: Any, source: str, error: type[ConfigError] = ConfigError, *,
                     not_mapping: str = "top level must be a mapping") -> M:
    """``data`` (a parsed document) as ``model``; every problem raised as ``error``."""
    if not isinstance(data, Mapping):
        raise error(source, [not_mapping])
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        raise error(source, format_errors(exc)) from None
