"""A pipeline's DAG, built once per config load and shared by every run.

Dependencies are the explicit ``after`` list plus every node that the node's
``input``, ``when`` or ``params`` expressions reference (``cmesh.expr``): a node
that reads ``embed.output`` cannot start before ``embed`` finished, whether or not
the config says so. Config validation only sees ``after``, so the cycle check is
repeated here with the implicit edges included.

Levels are the longest dependency chain before a node (level 0: no dependencies).
They drive the drawing and the topological order (level by level, declaration
order inside a level), which makes the default output node "the last sink".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from cmesh.config import NodeConfig, PipelineConfig
from cmesh.pipeline_check import implicit_dependencies, parse, validate_pipeline
from cmesh.validation import ConfigError
from protos import mesh_pb2

REQUEST = "request"          # the name expressions use for the pipeline's own inputs


@dataclass(frozen=True)
class PipelineGraph:
    name: str
    config: PipelineConfig
    deps: Mapping[str, tuple[str, ...]]        # node -> the nodes it waits for
    dependents: Mapping[str, tuple[str, ...]]  # node -> the nodes waiting for it
    ancestors: Mapping[str, frozenset[str]]    # transitive deps: what a node's env may hold
    levels: tuple[tuple[str, ...], ...]
    level_of: Mapping[str, int]
    order: tuple[str, ...]                     # topological: by level, then declaration order
    output: str
    when: Mapping[str, Any]                    # node -> parsed `when` expression (cmesh.expr.Expr)

    @classmethod
    def build(cls, name: str, config: PipelineConfig) -> "PipelineGraph":
        # MeshConfig runs the same checks at load; repeated so a graph can never be
        # built from a PipelineConfig that skipped them (unknown or self references,
        # unparsable expressions, cycles through implicit edges).
        problems = validate_pipeline(name, config)
        if problems:
            raise ConfigError(f"pipeline {name!r}", problems)
        implicit = implicit_dependencies(config)
        declared = list(config.nodes)
        deps: dict[str, tuple[str, ...]] = {}
        for node, cfg in config.nodes.items():
            wanted = set(cfg.after) | set(implicit.get(node, ()))
            deps[node] = tuple(n for n in declared if n in wanted and n != node)
        when = {node: parse(cfg.when) for node, cfg in config.nodes.items() if cfg.when is not None}
        level_of = _levels(deps, declared)
        if level_of is None:      # validate_pipeline reports cycles; this is a backstop
            raise ConfigError(f"pipeline {name!r}", [f"pipelines.{name}.nodes: the graph has a cycle"])
        depth = max(level_of.values()) + 1
        levels = tuple(tuple(n for n in declared if level_of[n] == lv) for lv in range(depth))
        order = tuple(n for level in levels for n in level)
        dependents = {n: tuple(m for m in order if n in deps[m]) for n in declared}
        ancestors: dict[str, frozenset[str]] = {}
        for n in order:                       # deps come first in `order`, so theirs are known
            ancestors[n] = frozenset(deps[n]).union(*(ancestors[d] for d in deps[n]))
        return cls(name=name, config=config, deps=deps, dependents=dependents, ancestors=ancestors,
                   levels=levels, level_of=level_of, order=order,
                   output=_output_node(config, order, dependents), when=when)

    def node(self, name: str) -> NodeConfig:
        return self.config.nodes[name]

    def describe(self) -> mesh_pb2.DescribeResponse:
        infos = []
        for n in self.order:
            cfg = self.node(n)
            infos.append(mesh_pb2.NodeInfo(
                node=n, model=cfg.model, depends_on=list(self.deps[n]), when=cfg.when or "",
                optional=cfg.optional, fallback=cfg.fallback or "", timeout_ms=cfg.timeout_ms or 0,
                stream=cfg.stream, level=self.level_of[n]))
        return mesh_pb2.DescribeResponse(pipeline=self.name, latency_class=self.config.latency_class,
                                         output=self.output, nodes=infos, drawing=self.drawing())

    def drawing(self) -> str:
        """The DAG as text, one line per level (a node per line where any has edges
        or markers), e.g.::

            pipeline support-agent (interactive), answer from: answer
            level 0: intent (intent-classifier), embed (embedder)
            level 1: retrieve (kb-index) <- embed
                     orders (sql-executor) <- intent  [optional, when: intent.label == 'order_status']
            level 2: answer (dialogue-llm) <- retrieve, orders  [stream, output]
        """
        lines = [f"pipeline {self.name} ({self.config.latency_class}), answer from: {self.output}"]
        for lv, level in enumerate(self.levels):
            head = f"level {lv}: "
            entries = [self._entry(n) for n in level]
            if all(not self.deps[n] and not self._marks(n) for n in level):
                lines.append(head + ", ".join(entries))
            else:
                lines.append(head + entries[0])
                lines.extend(" " * len(head) + e for e in entries[1:])
        return "\n".join(lines)

    def _entry(self, n: str) -> str:
        cfg = self.node(n)
        text = f"{n} ({cfg.model})"
        if self.deps[n]:
            text += " <- " + ", ".join(self.deps[n])
        marks = self._marks(n)
        return text + (f"  [{', '.join(marks)}]" if marks else "")

    def _marks(self, n: str) -> list[str]:
        cfg = self.node(n)
        marks = []
        if cfg.optional:
            marks.append("optional")
        if cfg.when:
            marks.append(f"when: {cfg.when}")
        if cfg.fallback:
            marks.append(f"fallback: {cfg.fallback}")
        if cfg.timeout_ms:
            marks.append(f"timeout: {cfg.timeout_ms}ms")
        if cfg.stream:
            marks.append("stream")
        if n == self.output:
            marks.append("output")
        return marks


def _levels(deps: Mapping[str, tuple[str, ...]], declared: list[str]) -> dict[str, int] | None:
    """Longest-chain level of every node (Kahn's algorithm); None on a cycle."""
    remaining = {n: len(deps[n]) for n in declared}
    level: dict[str, int] = {}
    ready = [n for n in declared if remaining[n] == 0]
    while ready:
        n = ready.pop()
        level[n] = max((level[d] + 1 for d in deps[n]), default=0)
        for m in declared:
            if n in deps[m]:
                remaining[m] -= 1
                if remaining[m] == 0:
                    ready.append(m)
    return level if len(level) == len(declared) else None


def _output_node(config: PipelineConfig, order: tuple[str, ...],
                 dependents: Mapping[str, tuple[str, ...]]) -> str:
    if config.output is not None:
        return config.output
    sinks = [n for n in order if not dependents[n]]
    # `order` ends with the deepest level, so its last node is always a sink.
    return sinks[0] if len(sinks) == 1 else order[-1]
