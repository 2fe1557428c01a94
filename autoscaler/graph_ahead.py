"""Graph-ahead scaling: a pipeline's upstream arrivals predict its downstream load.

A request to ``support-agent`` reaches the embedder and the classifier at once,
the vector index a few milliseconds later and the LLM after that. A downstream
model's own signal lags: its concurrency builds up over one service time
(seconds for an LLM) and the scaling windows average that build-up further. The
upstream models' arrivals show the same surge the moment it starts. So, per
downstream model ``d`` of a pipeline, with ``U(d)`` the models of the
pipeline's entry nodes (level 0) that ``d``'s node depends on::

    ratio_d   = long_rate(d) / Σ_u long_rate(u)        measured branch ratio
    W_d       = long_concurrency(d) / long_rate(d)      time a call spends at d (Little)
    ahead_d   = Σ_u short_rate(u) × ratio_d × W_d       concurrency on its way to d

A prediction is made only while the upstream arrivals are *rising* (short
rate above long rate): that is when ``d``'s own signal lags. Once the surge is
in the long window, or while it ebbs, ``d``'s own load is the better measure;
predicting then only re-counts a backlog (``W_d`` includes queueing, so while
``d`` is behind, rate x W over-states what is on its way) and holds replicas
that are no longer needed (on the paper's spike10x that cost 7 % more
replica-seconds for no better P95; ``loadtest.sim_paper``).

``ratio_d`` is measured, not configured, so it already holds a ``when`` that
is true for a quarter of the requests, an optional node, and upstream models
that also take direct (non-pipeline) traffic. The policy
(``autoscaler.policy.decide``) treats ``ahead_d`` as load already present, in
both windows. No prediction (None) while ``d`` or its upstream models have no
arrivals in the long window: a model never seen is not predicted.

Pure: no I/O, no clock; the controller (``autoscaler.graph_ahead: true``) and
the simulator call the same functions.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cmesh.config import MeshConfig

if TYPE_CHECKING:
    from autoscaler.window import MetricsWindow


@dataclass(frozen=True)
class Rates:
    """Per model: arrivals per second over a short and a long window, and the
    long window's mean concurrency."""

    short: Mapping[str, float]
    long: Mapping[str, float]
    concurrency: Mapping[str, float]


def model_edges(config: MeshConfig) -> dict[str, tuple[str, ...]]:
    """Downstream model -> the entry models upstream of it, over every pipeline
    (dependencies as the executor sees them: ``after`` plus expression references)."""
    from autoscaler.prewarm import node_dependencies

    edges: dict[str, set[str]] = {}
    for pipe in config.pipelines.values():
        deps = node_dependencies(pipe)
        for node in pipe.nodes:
            roots = _root_ancestors(node, deps)
            model = pipe.nodes[node].model
            ups = {pipe.nodes[r].model for r in roots} - {model}
            if ups:
                edges.setdefault(model, set()).update(ups)
    return {m: tuple(sorted(u)) for m, u in sorted(edges.items())}


def _root_ancestors(node: str, deps: Mapping[str, Iterable[str]]) -> set[str]:
    seen: set[str] = set()
    stack = list(deps.get(node, ()))
    roots: set[str] = set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        parents = list(deps.get(n, ()))
        if not parents:
            roots.add(n)
        stack.extend(parents)
    return roots


def window_rates(window: "MetricsWindow", models: Iterable[str], now: float, short_s: float,
                 long_s: float) -> Rates:
    """Arrival rates and mean concurrency from the autoscaler's metrics window;
    each rate is over the part of its window the data covers."""
    short: dict[str, float] = {}
    long: dict[str, float] = {}
    conc: dict[str, float] = {}
    for m in models:
        s_span, l_span = window.span(m, now, short_s), window.span(m, now, long_s)
        short[m] = window.arrivals(m, now, short_s) / s_span if s_span > 0 else 0.0
        long[m] = window.arrivals(m, now, long_s) / l_span if l_span > 0 else 0.0
        conc[m] = window.average_concurrency(m, now, long_s) or 0.0
    return Rates(short=short, long=long, concurrency=conc)


def ahead_concurrency(edges: Mapping[str, tuple[str, ...]], rates: Rates) -> dict[str, float]:
    """The concurrency each downstream model's upstream arrivals predict (see the
    module docstring); models without a prediction (never seen, or upstream
    arrivals not rising) are absent."""
    out: dict[str, float] = {}
    for model, ups in edges.items():
        own = rates.long.get(model, 0.0)
        up_long = sum(rates.long.get(u, 0.0) for u in ups)
        if own <= 0 or up_long <= 0:
            continue
        up_short = sum(rates.short.get(u, 0.0) for u in ups)
        if up_short <= up_long:
            continue                    # not rising: the model's own load decides
        ratio = own / up_long
        w = rates.concurrency.get(model, 0.0) / own
        out[model] = up_short * ratio * w
    return out
