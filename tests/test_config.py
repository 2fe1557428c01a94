"""mesh.yaml validation: the demo config loads; errors name the path and the rule."""
import pytest

from cmesh.config import load_config, parse_config
from cmesh.validation import ConfigError
from meshtest import REPO


def errors_of(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.errors


def test_demo_config_loads() -> None:
    config = load_config(REPO / "compose" / "mesh.yaml")
    assert {"embedder", "intent-classifier", "kb-index", "sql-executor", "dialogue-llm"} <= set(config.models)
    llm = config.models["dialogue-llm"]
    assert set(llm.variant_sources()) == {"a", "b"} and llm.default_variant() == "a"
    assert config.models["embedder"].variant_sources()["default"].source == "store://minilm-l6/1"
    assert "support-agent" in config.pipelines


@pytest.mark.parametrize("data, expected", [
    ({"models": {"embedder": {"source": "s", "batching": {"max_batch_size": 0}}}},
     "models.embedder.batching.max_batch_size: must be >= 1"),
    ({"models": {"e": {"source": "s", "deployment": {"capacity_threshold": 1.5}}}},
     "models.e.deployment.capacity_threshold: must be <= 1"),
    ({"models": {"e": {"source": "s", "deployment": {"mode": "sometimes"}}}},
     "models.e.deployment.mode: must be one of 'dedicated', 'serverless' or 'auto'"),
    ({"models": {"e": {"source": "s", "deployment": {"mode": "auto"}}}},
     "models.e.deployment.dedicated_replicas: mode 'auto' needs at least 1"),
    ({"models": {"e": {"source": "s", "deployment": {"min_replicas": 5, "max_replicas": 2}}}},
     "models.e.deployment.min_replicas: 5 exceeds max_replicas 2"),
    ({"models": {"e": {}}}, "models.e.source: give exactly one of source or variants"),
    ({"models": {"e": {"source": "s", "colour": "red"}}}, "models.e.colour: unknown field"),
    ({"models": {"e": {"source": "s", "resources": {"device": "tpu"}}}},
     "models.e.resources.device: must match ^(cpu|cuda(:\\d+)?)$"),
    ({"models": {"e": {"variants": {"a": {"source": "s", "weight": 0}}}}},
     "models.e.variants: weights must not all be 0"),
    ({"models": {"e": {"source": "s"}}, "pipelines": {"p": {"nodes": {"a": {"model": "zz"}}}}},
     "pipelines.p.nodes.a.model: unknown model 'zz'"),
    ({"models": {"e": {"source": "s"}},
      "pipelines": {"p": {"nodes": {"a": {"model": "e", "after": ["b"]},
                                    "b": {"model": "e", "after": ["a"]}}}}},
     "pipelines.p.nodes: the graph has a cycle"),
    ({"models": {"e": {"source": "s"}}, "pipelines": {"p": {"nodes": {"a": {"model": "e", "after": ["x"]}}}}},
     "pipelines.p.nodes.a.after: unknown node 'x'"),
    ({"models": {"e": {"source": "s"}}, "schedules": [{"model": "e", "cron": "every day", "hours": 1}]},
     "schedules.0.cron: must be a 5-field cron expression like '0 8 * * 1-5'"),
    ({"models": {"Bad Name": {"source": "s"}}}, "models.Bad Name: name must match ^[a-z0-9][a-z0-9_.-]*$"),
])
def test_errors_name_path_and_rule(data: dict, expected: str) -> None:
    assert expected in errors_of(data)


def test_unreadable_and_invalid_yaml(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_entry_point_overrides_build_a_new_validated_config() -> None:
    from cmesh.config import load_config, redis_url, with_overrides
    from cmesh.validation import ConfigError

    base = load_config(REPO / "compose" / "mesh.yaml")
    before = base.model_dump()
    over = with_overrides(base, {"router.autoscaler": "scaler:8500", "redis_url": "redis://r:6379/0",
                                 "autoscaler.provider": None})
    assert (over.router.autoscaler, over.redis_url) == ("scaler:8500", "redis://r:6379/0")
    assert over.models == base.models and base.model_dump() == before          # the original is untouched
    assert with_overrides(base, {"router.autoscaler": None}) is base
    with pytest.raises(ConfigError, match="autoscaler.provider"):
        with_overrides(base, {"autoscaler.provider": "nowhere"})
    assert redis_url("redis://flag", base, {"REDIS_URL": "redis://env"}) == "redis://flag"
    assert redis_url(None, base, {"REDIS_URL": "redis://env"}) == "redis://env"
    assert redis_url(None, base, {}) is None
