"""cmesh.config_diff: what `cmesh apply` shows before it applies, and the model
removals it refuses because a pipeline or schedule still names the model."""
from __future__ import annotations

import copy

import pytest

from cmesh.config import parse_config
from cmesh.config_diff import MAX_VALUE_CHARS, Change, diff_configs, removal_problems, render

BASE = {
    "models": {
        "embedder": {"source": "store://minilm/1"},
        "kb-index": {"source": "store://kb/1"},
        "llm": {"variants": {"a": {"source": "store://tiny/1", "weight": 90},
                             "b": {"source": "store://tiny/2", "weight": 10}}},
    },
    "pipelines": {
        "support-agent": {"nodes": {
            "embed": {"model": "embedder", "input": "request.text"},
            "retrieve": {"model": "kb-index", "input": "embed.output"},
            "answer": {"model": "llm", "after": ["retrieve"]},
        }},
    },
    "tenants": {"acme": {"api_keys_env": "KEYS_ACME"}},
    "schedules": [{"model": "embedder", "cron": "0 8 * * 1-5", "hours": 10}],
}


def edited(edit) -> dict:
    data = copy.deepcopy(BASE)
    edit(data)
    return data


def diff(edit) -> list[Change]:
    return diff_configs(parse_config(BASE), parse_config(edited(edit)))


def one(edit) -> Change:
    changes = diff(edit)
    assert len(changes) == 1, changes
    return changes[0]


def test_identical_and_defaults_spelled_out_are_no_change() -> None:
    assert diff_configs(parse_config(BASE), parse_config(BASE)) == []
    spelled = edited(lambda d: d["models"]["embedder"].update(
        deployment={"mode": "serverless", "max_replicas": 4}, latency_class="interactive",
        batching={"max_queue_size": 2048}, options={}))
    spelled["router"] = {"retry": {"max_attempts": 3}}
    spelled["store"] = "./.cmesh/store"
    assert diff_configs(parse_config(BASE), parse_config(spelled)) == []
    assert render([]) == []


def test_models_added_and_removed() -> None:
    def edit(d):
        del d["models"]["kb-index"]
        del d["pipelines"]
        d["models"]["reranker"] = {"source": "store://rr/1"}

    changes = diff(edit)
    assert Change("model_removed", "models.kb-index") in changes
    assert Change("model_added", "models.reranker") in changes
    assert "+ models.reranker (added)" in render(changes)
    assert "- models.kb-index (removed)" in render(changes)


def test_single_source_version() -> None:
    change = one(lambda d: d["models"]["embedder"].update(source="store://minilm/2"))
    assert change == Change("version", "models.embedder.source", "store://minilm/1", "store://minilm/2")
    assert render([change]) == ["~ models.embedder.source: store://minilm/1 -> store://minilm/2"]


def test_variant_source_weight_and_options() -> None:
    assert one(lambda d: d["models"]["llm"]["variants"]["b"].update(source="store://tiny/3")) == \
        Change("version", "models.llm.variants.b.source", "store://tiny/2", "store://tiny/3")
    weight = one(lambda d: d["models"]["llm"]["variants"]["b"].update(weight=50))
    assert weight == Change("weights", "models.llm.variants.b.weight", "10", "50")
    assert render([weight]) == ["~ models.llm.variants.b.weight: 10 -> 50"]
    assert one(lambda d: d["models"]["llm"]["variants"]["a"].update(options={"top_k": 5})) == \
        Change("model", "models.llm.variants.a.options.top_k", "", "5")


def test_variants_added_and_removed() -> None:
    def edit(d):
        variants = d["models"]["llm"]["variants"]
        del variants["b"]
        variants["c"] = {"source": "store://tiny/3", "weight": 10}

    changes = diff(edit)
    assert changes == [Change("version", "models.llm.variants.b", "store://tiny/2 (weight 10)", ""),
                       Change("version", "models.llm.variants.c", "", "store://tiny/3 (weight 10)")]
    assert render(changes) == ["- models.llm.variants.b (removed): store://tiny/2 (weight 10)",
                               "+ models.llm.variants.c (added): store://tiny/3 (weight 10)"]


def test_single_source_to_variants_is_default_removed() -> None:
    def edit(d):
        d["models"]["embedder"] = {"variants": {"x": {"source": "store://minilm/1"},
                                                "y": {"source": "store://minilm/2"}}}

    assert [(c.kind, c.path) for c in diff(edit)] == [
        ("version", "models.embedder.variants.default"),
        ("version", "models.embedder.variants.x"),
        ("version", "models.embedder.variants.y"),
    ]


def test_mode_and_other_deployment_fields() -> None:
    changes = diff(lambda d: d["models"]["embedder"].update(
        deployment={"mode": "auto", "dedicated_replicas": 1, "target_concurrency": 16}))
    assert changes == [
        Change("deployment", "models.embedder.deployment.dedicated_replicas", "0", "1"),
        Change("mode", "models.embedder.deployment.mode", "serverless", "auto"),
        Change("deployment", "models.embedder.deployment.target_concurrency", "8", "16"),
    ]


def test_rollout_as_compact_json_or_none() -> None:
    rollout = {"canary": "b", "steps": [10, 100], "interval_s": 30}
    added = one(lambda d: d["models"]["llm"].update(rollout=rollout))
    assert added.kind == "rollout" and added.path == "models.llm.rollout" and added.before == "none"
    assert added.after.startswith('{"canary":"b","steps":[10.0,100.0],"interval_s":30.0,')
    assert render([added])[0].startswith("~ models.llm.rollout: none -> {")
    data = edited(lambda d: d["models"]["llm"].update(rollout=rollout))
    removed = diff_configs(parse_config(data), parse_config(BASE))
    assert [(c.kind, c.after) for c in removed] == [("rollout", "none")]


@pytest.mark.parametrize("field, value, path, before, after", [
    ("engine", "hf-encoder", "models.embedder.engine", "none", "hf-encoder"),
    ("batching", {"max_batch_size": 64}, "models.embedder.batching.max_batch_size", "none", "64"),
    ("resources", {"memory_mb": 300}, "models.embedder.resources.memory_mb", "none", "300"),
    ("price", {"replica_second": 0.00011}, "models.embedder.price.replica_second", "0", "0.00011"),
    ("trust", {"mask_outputs": True}, "models.embedder.trust.mask_outputs", "false", "true"),
    ("internal", True, "models.embedder.internal", "false", "true"),
    ("latency_class", "batch", "models.embedder.latency_class", "interactive", "batch"),
    ("tenants", ["acme"], "models.embedder.tenants", "none", '["acme"]'),
    ("endpoints", ["127.0.0.1:9000"], "models.embedder.endpoints", "[]", '["127.0.0.1:9000"]'),
    ("options", {"pooling": "mean"}, "models.embedder.options.pooling", "", "mean"),
    ("backend", {"data_path": "unary"}, "models.embedder.backend.data_path", "none", "unary"),
])
def test_other_model_fields_to_the_leaf(field, value, path, before, after) -> None:
    assert one(lambda d: d["models"]["embedder"].update({field: value})) == \
        Change("model", path, before, after)


def test_pipelines() -> None:
    def add(d):
        d["pipelines"]["search"] = {"nodes": {"e": {"model": "embedder"}}}

    assert one(add) == Change("pipeline_added", "pipelines.search")
    assert one(lambda d: d["pipelines"].clear()) == Change("pipeline_removed", "pipelines.support-agent")
    assert one(lambda d: d["pipelines"]["support-agent"].update(latency_class="batch")) == \
        Change("pipeline", "pipelines.support-agent.latency_class", "interactive", "batch")


def test_pipeline_nodes_show_only_what_differs() -> None:
    changed = one(lambda d: d["pipelines"]["support-agent"]["nodes"]["answer"].update(
        optional=True, timeout_ms=500))
    assert changed == Change("pipeline", "pipelines.support-agent.nodes.answer",
                             '{"optional":false,"timeout_ms":null}', '{"optional":true,"timeout_ms":500}')

    def add(d):
        d["pipelines"]["support-agent"]["nodes"]["again"] = {"model": "llm", "after": ["answer"]}

    added = one(add)
    assert added == Change("pipeline", "pipelines.support-agent.nodes.again", "",
                           '{"model":"llm","after":["answer"]}')
    assert render([added]) == ['+ pipelines.support-agent.nodes.again (added): {"model":"llm","after":["answer"]}']


def test_tenants_and_schedules() -> None:
    assert one(lambda d: d["tenants"].update(globex={"api_keys_env": "K"})) == \
        Change("tenant_added", "tenants.globex")
    assert one(lambda d: d["tenants"]["acme"].update(rate_per_s=200)) == \
        Change("tenant", "tenants.acme.rate_per_s", "100", "200")
    schedules = one(lambda d: d["schedules"][0].update(hours=4))
    assert schedules.kind == "schedules" and schedules.path == "schedules"
    assert '"hours":10' in schedules.before and '"hours":4' in schedules.after


def test_settings_to_the_leaf() -> None:
    def edit(d):
        d.update(redis_url="redis://r:6379", router={"retry": {"max_attempts": 5}},
                 security={"admin_keys_env": "ADMIN"}, server={"limits": {"max_rank": 4}},
                 devices=[{"name": "big", "memory_mb": 65536}])

    changes = diff(edit)
    assert [(c.kind, c.path) for c in changes] == [
        ("setting", "devices"),
        ("setting", "redis_url"),
        ("setting", "router.retry.max_attempts"),
        ("setting", "security.admin_keys_env"),
        ("setting", "server.limits.max_rank"),
    ]
    assert changes[2] == Change("setting", "router.retry.max_attempts", "3", "5")
    assert changes[0].after == '[{"name":"big","kind":"cpu","memory_mb":65536,"max_replicas":null}]'


def test_order_is_by_path_and_keeps_a_models_lines_together() -> None:
    base = parse_config({"models": {"a": {"source": "s/1"}}})
    new = parse_config({"store": "/srv/store",
                        "models": {"a": {"source": "s/2", "engine": "e"}, "a-b": {"source": "t"}},
                        "tenants": {"t": {"api_keys_env": "K"}}})
    paths = [c.path for c in diff_configs(base, new)]
    assert paths == ["models.a.engine", "models.a.source", "models.a-b", "store", "tenants.t"]
    assert diff_configs(base, new) == diff_configs(base, new)


def test_long_values_are_cut() -> None:
    change = one(lambda d: d["models"]["embedder"].update(options={"prompt": "x" * 500}))
    assert len(change.after) == MAX_VALUE_CHARS and change.after.endswith("…")


def test_empty_string_is_shown_not_taken_for_absent() -> None:
    change = one(lambda d: d["models"]["embedder"].update(options={"prefix": "q"}))
    assert change.before == ""  # absent before
    data = edited(lambda d: d["models"]["embedder"].update(options={"prefix": "q"}))
    emptied = edited(lambda d: d["models"]["embedder"].update(options={"prefix": ""}))
    change = diff_configs(parse_config(data), parse_config(emptied))[0]
    assert change.after == '""' and render([change]) == ['~ models.embedder.options.prefix: q -> ""']


# --- removal_problems -----------------------------------------------------------


def test_removal_of_a_model_still_used() -> None:
    old = parse_config(BASE)

    def edit(d):
        del d["models"]["kb-index"]
        del d["models"]["embedder"]
        d["pipelines"]["support-agent"]["nodes"]["answer"]["fallback"] = "embedder"

    assert removal_problems(old, edited(edit)) == [
        "models.embedder: removed, but pipelines.support-agent.nodes.answer still uses it as its fallback",
        "models.embedder: removed, but pipelines.support-agent.nodes.embed still uses it",
        "models.embedder: removed, but schedules.0 still names it",
        "models.kb-index: removed, but pipelines.support-agent.nodes.retrieve still uses it",
    ]


def test_removals_nothing_still_uses_are_fine() -> None:
    old = parse_config(BASE)
    assert removal_problems(old, BASE) == []

    def edit(d):
        del d["models"]["kb-index"]
        del d["pipelines"]["support-agent"]["nodes"]["retrieve"]
        d["pipelines"]["support-agent"]["nodes"]["answer"]["after"] = []

    assert removal_problems(old, edited(edit)) == []


def test_empty_models_section_removes_every_model() -> None:
    old = parse_config(BASE)
    doc = {"models": None, "pipelines": BASE["pipelines"]}
    assert len(removal_problems(old, doc)) == 3


@pytest.mark.parametrize("doc", [
    None,
    "models: nope",
    [],
    {"models": ["embedder"]},
    {"models": {}, "pipelines": ["support-agent"]},
    {"models": {}, "pipelines": {"p": None}},
    {"models": {}, "pipelines": {"p": {"nodes": "retrieve"}}},
    {"models": {}, "pipelines": {"p": {"nodes": {"n": "kb-index"}}}},
    {"models": {}, "pipelines": {"p": {"nodes": {"n": {"model": ["kb-index"], "fallback": {"x": 1}}}}}},
    {"models": {}, "pipelines": {3: {"nodes": {4: {"model": 5}}}}},
    {"models": {}, "schedules": {"model": "embedder"}},
    {"models": {}, "schedules": [None, "embedder", {"model": None}, {"pipeline": "x"}]},
])
def test_malformed_documents_never_raise(doc) -> None:
    assert removal_problems(parse_config(BASE), doc) == []


def test_malformed_parts_are_skipped_readable_parts_still_checked() -> None:
    doc = {"models": {}, "pipelines": {"bad": 7, "p": {"nodes": {"x": None, "n": {"model": "kb-index"}}}},
           "schedules": ["junk", {"model": "embedder"}]}
    assert removal_problems(parse_config(BASE), doc) == [
        "models.embedder: removed, but schedules.1 still names it",
        "models.kb-index: removed, but pipelines.p.nodes.n still uses it",
    ]
