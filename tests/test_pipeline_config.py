"""Pipeline checks at config load (cmesh.pipeline_check): errors name pipeline, node and field."""
import pytest

from cmesh.config import PipelineConfig, load_config, parse_config
from cmesh.pipeline_check import (find_cycle, implicit_dependencies, node_expressions, render_params,
                                  validate_pipeline)
from cmesh.validation import ConfigError
from meshtest import REPO

MODELS = {"e": {"source": "s"}, "llm": {"source": "s"}}


def support_agent(**changes: dict) -> dict:
    nodes = {
        "intent": {"model": "e", "input": "request.text"},
        "embed": {"model": "e", "input": "request.text"},
        "retrieve": {"model": "e", "input": "embed.output"},
        "orders": {"model": "e", "when": "intent.label == 'order_status'", "optional": True},
        "answer": {"model": "llm", "input": "f'{join(retrieve.passages, \" \")} {default(orders.rows, \"none\")}'"},
    }
    for name, node in changes.items():
        nodes[name] = {**nodes.get(name, {"model": "e"}), **node}
    return {"models": MODELS, "pipelines": {"support-agent": {"nodes": nodes}}}


def errors_of(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.errors


def pipeline(nodes: dict) -> PipelineConfig:
    return PipelineConfig.model_validate({"nodes": nodes})


def test_demo_config_loads_with_its_expressions() -> None:
    config = load_config(REPO / "compose" / "mesh.yaml")
    for name, pipe in config.pipelines.items():
        assert validate_pipeline(name, pipe) == []
    deps = implicit_dependencies(config.pipelines["support-agent"])
    assert "embed" in deps["retrieve"] and "intent" in deps["orders"]


def test_valid_pipeline_and_implicit_dependencies() -> None:
    config = parse_config(support_agent())
    deps = implicit_dependencies(config.pipelines["support-agent"])
    # 'request' is the pipeline's input, not a node; nothing waits for it.
    assert deps == {"intent": set(), "embed": set(), "retrieve": {"embed"}, "orders": {"intent"},
                    "answer": {"retrieve", "orders"}}


def test_implicit_dependencies_cover_input_dicts_when_and_params() -> None:
    pipe = pipeline({
        "a": {"model": "e"},
        "b": {"model": "e"},
        "c": {"model": "e"},
        "d": {"model": "e"},
        "n": {"model": "e", "input": {"query": "'SELECT 1'", "params": "json({'id': a.id})"},
              "when": "b.ok", "params": {"top_k": 3, "stop": ["c.token", "'\\n'"], "k": {"deep": "d.n"}}},
    })
    assert implicit_dependencies(pipe)["n"] == {"a", "b", "c", "d"}
    assert [field for field, _ in node_expressions(pipe.nodes["n"])] == [
        "input.query", "input.params", "when", "params.stop.0", "params.stop.1", "params.k.deep"]


@pytest.mark.parametrize("changes, expected", [
    ({"orders": {"when": "(intent.label == 'x'))"}},
     "pipelines.support-agent.nodes.orders.when: unexpected ')' at 21"),
    ({"answer": {"input": "retreive.passages"}},
     "pipelines.support-agent.nodes.answer.input: unknown node 'retreive' "
     "(known: request, intent, embed, retrieve, orders)"),
    ({"answer": {"input": "eval(request.text)"}},
     "pipelines.support-agent.nodes.answer.input: unknown function 'eval'"),
    ({"answer": {"input": "request.__class__"}},
     "pipelines.support-agent.nodes.answer.input: names starting with '_' are not allowed"),
    ({"orders": {"when": "orders.rows"}},
     "pipelines.support-agent.nodes.orders.when: node 'orders' cannot reference itself"),
    ({"orders": {"input": {"query": "'SELECT'", "params": "json({'id': first_int(request.txt}"}}},
     "pipelines.support-agent.nodes.orders.input.params: expected ')', found '}' at 33"),
    ({"answer": {"params": {"max_tokens": 8, "stop": ["'a'", "nope"]}}},
     "pipelines.support-agent.nodes.answer.params.stop.1: unknown node 'nope'"),
    ({"answer": {"params": {"pattern": "re_find('(a+)+', request.text)"}}},
     "pipelines.support-agent.nodes.answer.params.pattern: re_find(): pattern nests repeats"),
    ({"request": {"input": "intent.label"}},
     "pipelines.support-agent.nodes.request: the name 'request' is reserved"),
])
def test_expression_errors_name_pipeline_node_and_field(changes, expected) -> None:
    errors = errors_of(support_agent(**changes))
    assert any(e.startswith(expected) for e in errors), errors


def test_cycles() -> None:
    # explicit (`after` only): reported by PipelineConfig itself
    explicit = {"models": MODELS, "pipelines": {"p": {"nodes": {
        "a": {"model": "e", "after": ["b"]}, "b": {"model": "e", "after": ["a"]}}}}}
    assert "pipelines.p.nodes: the graph has a cycle" in errors_of(explicit)
    # implicit: the nodes read each other
    implicit = {"models": MODELS, "pipelines": {"p": {"nodes": {
        "a": {"model": "e", "input": "b.output"}, "b": {"model": "e", "when": "a.label == 'x'"}}}}}
    assert errors_of(implicit) == ["pipelines.p.nodes: cycle a -> b -> a"]
    # mixed: one `after` edge, one expression edge, through a third node
    mixed = {"models": MODELS, "pipelines": {"p": {"nodes": {
        "a": {"model": "e", "input": "request.text", "after": ["c"]},
        "b": {"model": "e", "input": "a.output"},
        "c": {"model": "e", "params": {"x": "b.output"}}}}}}
    assert errors_of(mixed) == ["pipelines.p.nodes: cycle a -> c -> b -> a"]


def test_unknown_model_still_reported() -> None:
    data = support_agent(answer={"model": "zz"})
    assert "pipelines.support-agent.nodes.answer.model: unknown model 'zz'" in errors_of(data)


def test_validate_pipeline_reports_every_problem() -> None:
    pipe = pipeline({
        "a": {"model": "e", "input": "a.output"},
        "b": {"model": "e", "input": "x.y + z.w", "when": "'unclosed"},
    })
    assert validate_pipeline("p", pipe) == [
        "pipelines.p.nodes.a.input: node 'a' cannot reference itself",
        "pipelines.p.nodes.b.input: unknown node 'x' (known: request, a)",
        "pipelines.p.nodes.b.input: unknown node 'z' (known: request, a)",
        "pipelines.p.nodes.b.when: unterminated string at 0",
    ]


def test_nodes_named_with_dashes_get_a_hint() -> None:
    pipe = pipeline({"kb-lookup": {"model": "e"}, "answer": {"model": "e", "input": "kb-lookup.output"}})
    assert validate_pipeline("p", pipe)[0] == (
        "pipelines.p.nodes.answer.input: unknown node 'kb' (known: request, kb-lookup); 'kb-lookup' "
        "cannot be referenced: names in expressions are letters, digits and '_'")


def test_find_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"outside"}}) is None  # unknown names are someone else's error


def test_render_params_evaluates_every_string() -> None:
    env = {"request": {"text": "order 12"}, "n": None}
    params = {"top_k": 3, "id": "first_int(request.text)", "stop": ["'\\n'", "default(n.x, 'z')"],
              "opts": {"on": True, "label": "upper('a')"}}
    assert render_params(params, env) == {"top_k": 3, "id": 12, "stop": ["\n", "z"],
                                          "opts": {"on": True, "label": "A"}}
