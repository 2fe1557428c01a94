"""Static checks of a pipeline's expressions (DESIGN.md §3), run when mesh.yaml loads.

A node's ``input`` (a string, or tensor name -> string), ``when`` and every string
inside ``params`` (nested dicts and lists included) are expressions (cmesh.expr).
They may read ``request`` and the other nodes of the same pipeline; a node they
read is an implicit dependency, which the executor waits for just as for
``after``, so cycles are checked over both.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from cmesh.expr import ExprError, evaluate, parse

if TYPE_CHECKING:  # cmesh.config imports this module inside a validator
    from cmesh.config import NodeConfig, PipelineConfig

REQUEST = "request"


def node_expressions(node: NodeConfig) -> list[tuple[str, str]]:
    """(field path, expression text) for each expression of a node, e.g.
    ('input', ...), ('input.input_ids', ...), ('when', ...), ('params.stop.0', ...)."""
    found: list[tuple[str, str]] = []
    if isinstance(node.input, str):
        found.append(("input", node.input))
    elif isinstance(node.input, dict):
        found.extend((f"input.{tensor}", text) for tensor, text in node.input.items())
    if node.when is not None:
        found.append(("when", node.when))
    found.extend(_strings(node.params, "params"))
    return found


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, f"{path}.{i}")


def render_params(params: Any, env: Mapping[str, Any]) -> Any:
    """``params`` with every string evaluated, structure kept; the same strings
    ``node_expressions`` checks, so what loads is what runs."""
    if isinstance(params, str):
        return evaluate(parse(params), env)
    if isinstance(params, Mapping):
        return {key: render_params(item, env) for key, item in params.items()}
    if isinstance(params, list):
        return [render_params(item, env) for item in params]
    return params


def implicit_dependencies(pipeline: PipelineConfig) -> dict[str, set[str]]:
    """Node -> the other nodes of the pipeline its expressions read.

    Unparsable expressions and unknown names are skipped here; validate_pipeline
    reports them."""
    deps: dict[str, set[str]] = {}
    for name, node in pipeline.nodes.items():
        deps[name] = set()
        for _, text in node_expressions(node):
            try:
                roots = parse(text).roots()
            except ExprError:
                continue
            deps[name] |= {r for r in roots if r in pipeline.nodes and r != name}
    return deps


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """A cycle as [a, b, ..., a] (a needs b ...), or None; deterministic: nodes
    and their dependencies are visited in the graph's order."""
    rank = {n: i for i, n in enumerate(graph)}
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted((m for m in graph[n] if m in rank), key=rank.__getitem__):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = 2
        path.pop()
        return None

    for n in graph:
        if n not in state and (found := visit(n)):
            return found
    return None


def _unnameable_hint(root: str, known: list[str]) -> str:
    # 'kb-lookup.output' parses as 'kb - lookup.output': say why, not just "unknown 'kb'".
    names = [n for n in known if not n.isidentifier() and n.startswith(root)]
    if not names:
        return ""
    return (f"; {', '.join(repr(n) for n in names)} cannot be referenced: names in expressions "
            f"are letters, digits and '_'")


def validate_pipeline(name: str, pipeline: PipelineConfig) -> list[str]:
    """Every problem with the pipeline's expressions, as 'path: message' lines,
    e.g. ``pipelines.p.nodes.answer.input: unknown node 'retreive' (known: ...)``."""
    prefix = f"pipelines.{name}.nodes"
    errors: list[str] = []
    if REQUEST in pipeline.nodes:
        errors.append(f"{prefix}.{REQUEST}: the name {REQUEST!r} is reserved for the pipeline's input")
    for nname, node in pipeline.nodes.items():
        known = [REQUEST] + [n for n in pipeline.nodes if n not in (nname, REQUEST)]
        for field, text in node_expressions(node):
            where = f"{prefix}.{nname}.{field}"
            try:
                expr = parse(text)
            except ExprError as exc:
                errors.append(f"{where}: {exc}")
                continue
            for root in sorted(expr.roots()):
                if root == nname:
                    errors.append(f"{where}: node {nname!r} cannot reference itself")
                elif root not in known:
                    errors.append(f"{where}: unknown node {root!r} (known: {', '.join(known)})"
                                  + _unnameable_hint(root, known))
    implicit = implicit_dependencies(pipeline)
    graph = {n: set(node.after) | implicit[n] for n, node in pipeline.nodes.items()}
    cycle = find_cycle(graph)
    if cycle is not None:
        errors.append(f"{prefix}: cycle {' -> '.join(cycle)}")
    return errors
