"""Coordinated pre-warming: the first touch of a pipeline warms all of it.

A pipeline is a chain of models. If each model scales from zero only when a
request reaches it, a cold pipeline pays every cold start *in series*: embed
starts, then retrieve is touched and starts, then the LLM. Instead, the first
request that touches any model of a pipeline at zero makes the autoscaler start
every other model of that pipeline at once, so the cold starts overlap and the
request waits for (roughly) the longest one, not their sum.

All of them start at once whenever capacity allows; the plan's order matters
only when it does not (a provider that starts k replicas at a time, a device
that fits only some). Then the order is by *latest start time*: a model whose
first node can begin ``needed_at`` seconds after the pipeline starts, and that
takes ``cold_start`` seconds to come up, must start by ``needed_at - cold_start``
not to hold the chain up. Least slack first means

* without estimates, the model needed soonest (shallowest in the graph) starts
  first, and its successors follow in dependency order;
* a model with a long cold start starts early even if it is needed late,
  because it is the one that would make the chain wait (a 30 s LLM load
  before a 1 s embedder that is needed first but is ready long before the LLM).

Ties go to the earlier-needed model, then to the longer cold start.

Dependencies are a node's ``after`` list plus the nodes its ``input`` and
``when`` refer to (``input: embed.output`` depends on node ``embed`` even
without ``after: [embed]``), as the executor must wait for them too.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from cmesh.config import MeshConfig, PipelineConfig
from cmesh.errors import NotFound

_TOKEN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


@dataclass(frozen=True)
class WarmItem:
    model: str
    pipeline: str          # the pipeline in which it is needed earliest
    level: int             # longest dependency path to its earliest node (0: needs nothing)
    needed_at_s: float     # estimated start of its earliest node after the pipeline starts
    cold_start_s: float    # estimate (0 when unknown)

    @property
    def start_by_s(self) -> float:
        """Latest start that does not delay the chain (negative: already late)."""
        return self.needed_at_s - self.cold_start_s


@dataclass(frozen=True)
class WarmPlan:
    trigger: str | None              # the model that was touched (not in items)
    pipelines: tuple[str, ...]       # pipelines the trigger belongs to
    items: tuple[WarmItem, ...]      # every other model of them, highest priority first

    @property
    def models(self) -> list[str]:
        return [i.model for i in self.items]

    @property
    def order(self) -> list[tuple[str, int]]:
        """(model, level) in priority order."""
        return [(i.model, i.level) for i in self.items]


def node_dependencies(pipeline: PipelineConfig) -> dict[str, frozenset[str]]:
    """Each node's direct dependencies: ``after`` plus nodes named by its
    ``input`` (``"embed.output"`` → ``embed``; ``request.*`` is the request) and
    by its ``when`` expression."""
    from cmesh.pipeline_check import implicit_dependencies

    # One reading of expressions for the whole mesh: the pipeline checker's.
    implicit = implicit_dependencies(pipeline)
    return {name: frozenset(set(node.after) | implicit.get(name, set()))
            for name, node in pipeline.nodes.items()}


def models_of_pipeline(config: MeshConfig, pipeline: str) -> list[str]:
    """The pipeline's models, each once, in dependency order (roots first)."""
    pipe = _pipeline(config, pipeline)
    levels = _node_times(node_dependencies(pipe), lambda n: 1.0)
    seen: dict[str, None] = {}
    for node in sorted(pipe.nodes, key=lambda n: (levels[n], n)):
        seen.setdefault(pipe.nodes[node].model, None)
    return list(seen)


def pipelines_of_model(config: MeshConfig, model: str) -> list[str]:
    return [name for name, pipe in config.pipelines.items()
            if any(node.model == model for node in pipe.nodes.values())]


def warm_plan(config: MeshConfig, model: str | None, *, pipeline: str | None = None,
              cold_start_s: Mapping[str, float] | None = None,
              compute_s: Mapping[str, float] | None = None) -> WarmPlan:
    """What to warm because ``model`` was touched (cold).

    ``pipeline`` narrows the plan to the pipeline the touching request runs in
    (the router knows it); without it every pipeline containing the model
    counts. With ``model`` None, the whole of ``pipeline`` is planned (a
    scheduled or explicit warm-up). Estimates are per model, in seconds:
    ``cold_start_s`` (the replicas' own measurements) and ``compute_s`` (one
    call's latency); unknown ones count as 0."""
    if model is not None:
        config.model(model)                          # NotFound for an unknown model
    if pipeline is not None:
        _pipeline(config, pipeline)
        names = [pipeline]
    elif model is not None:
        names = pipelines_of_model(config, model)
    else:
        raise ValueError("warm_plan needs a model or a pipeline")
    cold = cold_start_s or {}
    compute = compute_s or {}

    best: dict[str, WarmItem] = {}
    for pname in names:
        pipe = config.pipelines[pname]
        deps = node_dependencies(pipe)
        needed = _node_times(deps, lambda n: compute.get(pipe.nodes[n].model, 0.0))
        levels = _node_times(deps, lambda n: 1.0)
        for node, cfg in pipe.nodes.items():
            if cfg.model == model:
                continue
            item = WarmItem(model=cfg.model, pipeline=pname, level=int(levels[node]),
                            needed_at_s=needed[node], cold_start_s=float(cold.get(cfg.model, 0.0)))
            prev = best.get(cfg.model)
            if prev is None or (item.needed_at_s, item.level) < (prev.needed_at_s, prev.level):
                best[cfg.model] = item
    items = sorted(best.values(), key=lambda i: (i.start_by_s, i.needed_at_s, -i.cold_start_s,
                                                 i.level, i.model))
    return WarmPlan(trigger=model, pipelines=tuple(names), items=tuple(items))


def serial_cold_start_s(config: MeshConfig, pipeline: str, cold_start_s: Mapping[str, float]) -> float:
    """What a cold pipeline waits for cold starts when each model warms only as a
    node first reaches it: the longest dependency path, summing each node's model
    start (models missing from ``cold_start_s``, e.g. a branch not taken, count 0).
    Coordinated warming can at best bring this down to the longest single start."""
    pipe = _pipeline(config, pipeline)

    def cost(node: str) -> float:
        return float(cold_start_s.get(pipe.nodes[node].model, 0.0))

    starts = _node_times(node_dependencies(pipe), cost)
    return max((starts[n] + cost(n) for n in pipe.nodes), default=0.0)


# ------------------------------------------------------------------- helpers


def _pipeline(config: MeshConfig, name: str) -> PipelineConfig:
    try:
        return config.pipelines[name]
    except KeyError:
        raise NotFound(f"unknown pipeline {name!r}", pipeline=name) from None



def _node_times(deps: Mapping[str, frozenset[str]], cost) -> dict[str, float]:
    """Earliest start of every node: the max over its dependencies of their
    start plus ``cost(dep)``. With cost 1 this is the node's level.

    ``after`` is checked acyclic by the config; an implicit reference could
    still close a cycle, so an edge back into the current path is ignored
    rather than recursing forever."""
    start: dict[str, float] = {}
    visiting: set[str] = set()

    def visit(node: str) -> float:
        if node in start:
            return start[node]
        visiting.add(node)
        t = 0.0
        for dep in sorted(deps.get(node, ())):
            if dep in visiting:
                continue
            t = max(t, visit(dep) + cost(dep))
        visiting.discard(node)
        start[node] = t
        return t

    for node in deps:
        visit(node)
    return start
