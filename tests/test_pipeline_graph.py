"""PipelineGraph: dependencies (explicit + implicit), levels, output node, describe."""
from __future__ import annotations

import pytest

from cmesh.config import PipelineConfig
from cmesh.validation import ConfigError
from router.pipelines.graph import PipelineGraph

SUPPORT = {
    "latency_class": "interactive",
    "nodes": {
        "intent": {"model": "intent-classifier", "input": "request.text"},
        "embed": {"model": "embedder", "input": "request.text"},
        "retrieve": {"model": "kb-index", "input": "embed.output", "after": ["embed"]},
        "orders": {"model": "sql-executor", "when": "intent.label == 'order_status'",
                   "optional": True},
        "answer": {"model": "dialogue-llm", "after": ["retrieve", "orders"], "stream": True,
                   "fallback": "small-llm", "timeout_ms": 500},
    },
}


def build(spec: dict, name: str = "support-agent") -> PipelineGraph:
    return PipelineGraph.build(name, PipelineConfig.model_validate(spec))


def test_dependencies_union_explicit_and_implicit():
    g = build(SUPPORT)
    assert g.deps["retrieve"] == ("embed",)                 # after and input agree: once
    assert g.deps["orders"] == ("intent",)                   # only from `when`
    assert set(g.deps["answer"]) == {"retrieve", "orders"}
    assert g.deps["intent"] == () and g.deps["embed"] == ()
    assert set(g.dependents["embed"]) == {"retrieve"}
    assert g.ancestors["answer"] == {"retrieve", "orders", "embed", "intent"}


def test_levels_are_longest_chains():
    g = build(SUPPORT)
    assert g.levels == (("intent", "embed"), ("retrieve", "orders"), ("answer",))
    assert g.level_of == {"intent": 0, "embed": 0, "retrieve": 1, "orders": 1, "answer": 2}
    assert g.order == ("intent", "embed", "retrieve", "orders", "answer")


def test_level_uses_longest_not_shortest_path():
    g = build({"nodes": {"a": {"model": "m"}, "b": {"model": "m", "after": ["a"]},
                         "c": {"model": "m", "after": ["a", "b"]}}})
    assert g.level_of == {"a": 0, "b": 1, "c": 2}


def test_implicit_dependency_from_input_mapping():
    g = build({"nodes": {"q": {"model": "m", "input": "request.text"},
                         "r": {"model": "m", "input": {"query": "q.output", "k": "request.k"}}}})
    assert g.deps["r"] == ("q",)
    assert g.output == "r"


def test_output_node_explicit():
    g = build({**SUPPORT, "output": "retrieve"})
    assert g.output == "retrieve"


def test_output_node_single_sink():
    assert build(SUPPORT).output == "answer"


def test_output_node_several_sinks_takes_last_in_topological_order():
    g = build({"nodes": {"deep": {"model": "m", "after": ["mid"]},
                         "root": {"model": "m"},
                         "mid": {"model": "m", "after": ["root"]},
                         "side": {"model": "m"}}})
    # Sinks: deep (level 2) and side (level 0); the deepest level comes last.
    assert g.order[-1] == "deep"
    assert g.output == "deep"


def test_output_node_several_sinks_same_level_takes_last_declared():
    g = build({"nodes": {"a": {"model": "m"}, "b": {"model": "m"}, "c": {"model": "m"}}})
    assert g.output == "c"


def test_cycle_through_implicit_edges_is_rejected():
    spec = {"nodes": {"a": {"model": "m", "input": "b.output"},
                      "b": {"model": "m", "after": ["a"]},
                      "c": {"model": "m"}}}
    with pytest.raises(ConfigError) as info:
        build(spec, "loop")
    text = str(info.value)
    assert "cycle" in text and "pipelines.loop" in text
    assert "a" in text and "b" in text


def test_self_reference_is_rejected():
    with pytest.raises(ConfigError, match="itself"):
        build({"nodes": {"a": {"model": "m", "when": "a.label == 'x'"}}})


def test_describe_lists_nodes_with_levels_and_markers():
    d = build(SUPPORT).describe()
    assert d.pipeline == "support-agent" and d.latency_class == "interactive" and d.output == "answer"
    infos = {n.node: n for n in d.nodes}
    assert [n.node for n in d.nodes] == ["intent", "embed", "retrieve", "orders", "answer"]
    assert infos["answer"].level == 2 and set(infos["answer"].depends_on) == {"retrieve", "orders"}
    assert infos["orders"].optional and infos["orders"].when == "intent.label == 'order_status'"
    assert list(infos["orders"].depends_on) == ["intent"]
    assert infos["answer"].fallback == "small-llm" and infos["answer"].timeout_ms == 500
    assert infos["answer"].stream and not infos["retrieve"].stream


def test_describe_drawing_reads_by_level():
    drawing = build(SUPPORT).describe().drawing
    lines = drawing.splitlines()
    assert lines[0].startswith("pipeline support-agent") and "answer" in lines[0]
    assert lines[1] == "level 0: intent (intent-classifier), embed (embedder)"
    assert lines[2] == "level 1: retrieve (kb-index) <- embed"
    assert lines[3].strip() == ("orders (sql-executor) <- intent  "
                                "[optional, when: intent.label == 'order_status']")
    assert lines[3].startswith(" " * len("level 1: "))      # aligned under its level
    assert lines[4] == ("level 2: answer (dialogue-llm) <- retrieve, orders  "
                        "[fallback: small-llm, timeout: 500ms, stream, output]")
