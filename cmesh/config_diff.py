"""What changed between two mesh configs (``cmesh apply`` prints it before it
applies), and which model removals would leave a pipeline or schedule naming a
model that is gone.

Pure functions. Values are compared as ``model_dump(mode="json")``, so a field
left at its default and one set to the same value are equal.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from cmesh.config import MeshConfig, ModelConfig, NodeConfig

MAX_VALUE_CHARS = 120
# Sections with their own kinds; every other top-level field is a "setting".
_OWN_SECTIONS = ("models", "pipelines", "tenants", "schedules")


class _Absent:
    """A key present on one side only (an added or removed entry)."""

    def __repr__(self) -> str:
        return "<absent>"


ABSENT: Any = _Absent()


@dataclass(frozen=True)
class Change:
    """One difference. ``before`` and ``after`` are short display strings; ""
    means absent on that side (an added or removed entry), so a value that is
    the empty string is shown as ``""``."""

    kind: str
    path: str
    before: str = ""
    after: str = ""


_Keyed = tuple[tuple[str, ...], Change]


def diff_configs(old: MeshConfig, new: MeshConfig) -> list[Change]:
    """Every difference, sorted by path segment by segment (so one model's lines
    stay together even when another model's name extends it, as ``a`` and ``a-b``)."""
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")
    found: list[_Keyed] = []
    found += _entries("model", ("models",), old.models, new.models, _model)
    found += _entries("pipeline", ("pipelines",), a["pipelines"], b["pipelines"], _pipeline)
    found += _entries("tenant", ("tenants",), a["tenants"], b["tenants"])
    if a["schedules"] != b["schedules"]:
        found.append(_change("schedules", ("schedules",), a["schedules"], b["schedules"]))
    for field in sorted(a.keys() | b.keys()):
        if field not in _OWN_SECTIONS:
            found += _walk("setting", (field,), a.get(field, ABSENT), b.get(field, ABSENT))
    found.sort(key=lambda item: (item[0], item[1].kind))
    return [change for _, change in found]


def render(changes: Iterable[Change]) -> list[str]:
    """One line per change: ``+ path (added)``, ``- path (removed)``, or
    ``~ path: before -> after``."""
    return [_line(change) for change in changes]


def _line(change: Change) -> str:
    if change.kind.endswith("_added") or (not change.before and change.after):
        return f"+ {change.path} (added)" + (f": {change.after}" if change.after else "")
    if change.kind.endswith("_removed") or (change.before and not change.after):
        return f"- {change.path} (removed)" + (f": {change.before}" if change.before else "")
    return f"~ {change.path}: {change.before} -> {change.after}"


# --- models ------------------------------------------------------------------


def _model(at: tuple[str, ...], old: ModelConfig, new: ModelConfig) -> Iterator[_Keyed]:
    yield from _variants(at, old, new)
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")
    for field in sorted(a.keys() | b.keys()):
        va, vb = a.get(field, ABSENT), b.get(field, ABSENT)
        if field in ("source", "variants") or va == vb:
            continue  # sources compared per variant above
        if field == "rollout":
            yield _change("rollout", at + (field,), va, vb)
        elif field == "deployment" and isinstance(va, dict) and isinstance(vb, dict):
            for key in sorted(va.keys() | vb.keys()):
                yield from _walk("mode" if key == "mode" else "deployment", at + (field, key),
                                 va.get(key, ABSENT), vb.get(key, ABSENT))
        else:
            yield from _walk("model", at + (field,), va, vb)


def _variants(at: tuple[str, ...], old: ModelConfig, new: ModelConfig) -> Iterator[_Keyed]:
    # A single-source model is one variant named "default" (variant_sources), so a
    # switch to or from variants reads as variants added and removed.
    va = {k: v.model_dump(mode="json") for k, v in old.variant_sources().items()}
    vb = {k: v.model_dump(mode="json") for k, v in new.variant_sources().items()}
    single = old.variants is None and new.variants is None
    for name in sorted(va.keys() | vb.keys()):
        here = at + ("variants", name)
        if name not in vb:
            yield _change("version", here, _variant_summary(va[name]), ABSENT)
        elif name not in va:
            yield _change("version", here, ABSENT, _variant_summary(vb[name]))
        else:
            a, b = va[name], vb[name]
            yield from _walk("version", at + ("source",) if single else here + ("source",),
                             a["source"], b["source"])
            yield from _walk("weights", here + ("weight",), a["weight"], b["weight"])
            for key in sorted((a.keys() | b.keys()) - {"source", "weight"}):
                yield from _walk("model", here + (key,), a.get(key, ABSENT), b.get(key, ABSENT))


def _variant_summary(variant: Mapping[str, Any]) -> str:
    return f"{variant['source']} (weight {_show(variant['weight'])})"


# --- pipelines, tenants, generic walks -----------------------------------------


def _pipeline(at: tuple[str, ...], a: Mapping[str, Any], b: Mapping[str, Any]) -> Iterator[_Keyed]:
    for field in sorted(a.keys() | b.keys()):
        if field != "nodes":
            yield from _walk("pipeline", at + (field,), a.get(field, ABSENT), b.get(field, ABSENT))
    yield from _nodes(at + ("nodes",), a.get("nodes", {}), b.get("nodes", {}))


def _nodes(at: tuple[str, ...], old: Mapping[str, Any], new: Mapping[str, Any]) -> Iterator[_Keyed]:
    # One line per node: an added or removed node without its defaults, a changed
    # one as just the fields that differ, so the line fits in MAX_VALUE_CHARS.
    for name in sorted(old.keys() | new.keys()):
        a, b = old.get(name, ABSENT), new.get(name, ABSENT)
        if a == b:
            continue
        if a is ABSENT or b is ABSENT:
            yield _change("pipeline", at + (name,), _non_default_node(a), _non_default_node(b))
        else:
            keys = [k for k in a.keys() | b.keys() if a.get(k, ABSENT) != b.get(k, ABSENT)]
            yield _change("pipeline", at + (name,), {k: a.get(k) for k in sorted(keys)},
                          {k: b.get(k) for k in sorted(keys)})


def _non_default_node(node: Any) -> Any:
    if node is ABSENT:
        return ABSENT
    return NodeConfig.model_validate(node).model_dump(mode="json", exclude_defaults=True)


def _entries(kind: str, at: tuple[str, ...], old: Mapping[str, Any], new: Mapping[str, Any],
             compare: Callable[[tuple[str, ...], Any, Any], Iterator[_Keyed]] | None = None) -> Iterator[_Keyed]:
    """Entries added, removed, and (``compare``, else a walk to the leaves) changed."""
    for name in sorted(old.keys() | new.keys()):
        here = at + (name,)
        if name not in new:
            yield _change(f"{kind}_removed", here)
        elif name not in old:
            yield _change(f"{kind}_added", here)
        elif compare is not None:
            yield from compare(here, old[name], new[name])
        else:
            yield from _walk(kind, here, old[name], new[name])


def _walk(kind: str, at: tuple[str, ...], old: Any, new: Any) -> Iterator[_Keyed]:
    """Down to the leaves where both sides are mappings; a list is one leaf."""
    if old == new:
        return
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(old.keys() | new.keys(), key=str):
            yield from _walk(kind, at + (str(key),), old.get(key, ABSENT), new.get(key, ABSENT))
    else:
        yield _change(kind, at, old, new)


def _change(kind: str, at: tuple[str, ...], before: Any = ABSENT, after: Any = ABSENT) -> _Keyed:
    return at, Change(kind, ".".join(at), _show(before), _show(after))


def _show(value: Any) -> str:
    if value is ABSENT:
        return ""
    if value is None:
        return "none"
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float) and value.is_integer():
        text = str(int(value))  # weights read "10 -> 50", not "10.0 -> 50.0"
    elif isinstance(value, (int, float)):
        text = repr(value)
    elif isinstance(value, str):
        text = value or '""'
    else:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


# --- removals ------------------------------------------------------------------


def removal_problems(old: MeshConfig, new_data: Mapping[str, Any]) -> list[str]:
    """'path: rule' lines for each model of ``old`` that ``new_data`` (a raw,
    unvalidated document) removes while one of its pipeline nodes (model or
    fallback) or schedules still names it. Whatever part of the document cannot
    be read is skipped: validation reports it."""
    if not isinstance(new_data, Mapping):
        return []
    models = new_data.get("models")
    if models is None:
        models = {}  # "models:" with nothing under it removes every model
    if not isinstance(models, Mapping):
        return []
    removed = {name for name in old.models if name not in models}
    if not removed:
        return []
    problems = []
    for pname, nname, node in _raw_nodes(new_data.get("pipelines")):
        for field, how in (("model", ""), ("fallback", " as its fallback")):
            name = node.get(field)
            if isinstance(name, str) and name in removed:
                problems.append(f"models.{name}: removed, but pipelines.{pname}.nodes.{nname} "
                                f"still uses it{how}")
    schedules = new_data.get("schedules")
    for i, schedule in enumerate(schedules if isinstance(schedules, list) else []):
        name = schedule.get("model") if isinstance(schedule, Mapping) else None
        if isinstance(name, str) and name in removed:
            problems.append(f"models.{name}: removed, but schedules.{i} still names it")
    return sorted(problems)


def _raw_nodes(pipelines: Any) -> Iterator[tuple[str, str, Mapping[str, Any]]]:
    if not isinstance(pipelines, Mapping):
        return
    for pname, pipe in pipelines.items():
        nodes = pipe.get("nodes") if isinstance(pipe, Mapping) else None
        if isinstance(nodes, Mapping):
            for nname, node in nodes.items():
                if isinstance(node, Mapping):
                    yield str(pname), str(nname), node
