"""Pure trace arithmetic: per-node time split, critical path, shares (DESIGN.md §5).

No clock and no I/O: the executor measures, this module only derives. Times are
milliseconds since the pipeline started.
"""
from __future__ import annotations

from typing import Collection, Mapping, Sequence

from protos import mesh_pb2


def node_trace(node: str, model: str, status: str, start_ms: float, end_ms: float, *,
               queue_ms: float = 0.0, cold_start_ms: float = 0.0, compute_ms: float = 0.0,
               variant: str = "", model_used: str = "", error: str = "",
               input_tokens: int = 0, output_tokens: int = 0, cost: float = 0.0) -> mesh_pb2.NodeTrace:
    """One node's span. Network is whatever the replica and the router's queue do
    not account for (transport, (de)serialisation, a failed first attempt before a
    fallback); floored at 0 because the parts come from different clocks."""
    duration = max(0.0, end_ms - start_ms)
    network = max(0.0, duration - queue_ms - cold_start_ms - compute_ms)
    return mesh_pb2.NodeTrace(
        node=node, model=model, variant=variant, status=status, start_ms=start_ms, end_ms=end_ms,
        queue_ms=queue_ms, cold_start_ms=cold_start_ms, compute_ms=compute_ms, network_ms=network,
        error=error, input_tokens=input_tokens, output_tokens=output_tokens, cost=cost,
        model_used=model_used)


def critical_path(spans: Mapping[str, mesh_pb2.NodeTrace], deps: Mapping[str, Collection[str]],
                  output: str) -> list[str]:
    """The chain that decided when ``output`` could finish, first node first.

    From the output node, step to the dependency that finished last (it is the
    one the node was waiting for); on a tie, the longer one, then the name, so the
    answer is deterministic. Dependencies without a span (never reached) are ignored.
    """
    if output not in spans:
        return []
    path = [output]
    current = output
    while True:
        candidates = [d for d in deps.get(current, ()) if d in spans]
        if not candidates:
            break
        current = max(candidates, key=lambda d: (spans[d].end_ms, _duration(spans[d]), d))
        path.append(current)
    path.reverse()
    return path


def build_trace(pipeline: str, nodes: Sequence[mesh_pb2.NodeTrace],
                deps: Mapping[str, Collection[str]], output: str, total_ms: float,
                request_id: str = "") -> mesh_pb2.Trace:
    """The response trace: every node's span, the critical ones marked."""
    spans = {n.node: n for n in nodes}
    path = critical_path(spans, deps, output)
    on_path = set(path)
    marked = []
    for n in nodes:
        copy = mesh_pb2.NodeTrace()
        copy.CopyFrom(n)
        copy.critical = n.node in on_path
        marked.append(copy)
    return mesh_pb2.Trace(request_id=request_id, pipeline=pipeline, total_ms=total_ms,
                          nodes=marked, critical_path=path)


def share_of_critical_path(trace: mesh_pb2.Trace) -> dict[str, float]:
    """Fraction of the critical path's wall time spent inside each of its nodes.

    The path's wall time runs from the pipeline start to the end of its last node
    (the output node). Shares sum to at most 1; the rest is the executor's own
    scheduling between a dependency finishing and its dependent starting.
    """
    spans = {n.node: n for n in trace.nodes}
    path = [n for n in trace.critical_path if n in spans]
    if not path:
        return {}
    span = spans[path[-1]].end_ms
    if span <= 0:
        return {n: 0.0 for n in path}
    return {n: min(1.0, _duration(spans[n]) / span) for n in path}


def _duration(span: mesh_pb2.NodeTrace) -> float:
    return max(0.0, span.end_ms - span.start_ms)
