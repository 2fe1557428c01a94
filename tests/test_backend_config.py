"""``backend:`` of a model: validated at load, and what it puts in the endpoint table."""
from __future__ import annotations

import pytest

from cmesh.config import parse_config
from cmesh.validation import ConfigError
from router.backends.secrets import secrets_from_env
from router.endpoints import EndpointTable, ExternalSource, external_table

MESH = {"source": "store://m/1"}
OIP = {"backend": {"kind": "oip", "endpoints": ["10.0.0.1:8081", "10.0.0.2:8081"], "model_name": "sklearn-iris",
                   "versions": {"default": "v3"}, "max_inflight_per_endpoint": 4}}


def config(**models):
    return parse_config({"models": models})


def test_default_backend_is_mesh():
    cfg = config(m=MESH)
    assert cfg.models["m"].backend.kind == "mesh" and not cfg.models["m"].external
    assert list(cfg.scaled_models) == ["m"]


def test_oip_backend_needs_no_source_and_is_not_scaled():
    cfg = config(ext=OIP, m=MESH)
    assert cfg.models["ext"].external and list(cfg.scaled_models) == ["m"]
    table = external_table(cfg)["ext"]
    assert [r.address for r in table] == ["10.0.0.1:8081", "10.0.0.2:8081"]
    assert {r.kind for r in table} == {"oip"} and {r.max_inflight for r in table} == {4}


@pytest.mark.parametrize("backend, message", [
    ({"kind": "nim"}, "models.m.backend.kind"),
    ({"kind": "oip"}, "exactly one of endpoints or dns"),
    ({"kind": "oip", "endpoints": ["a:1"], "dns": "svc:1"}, "exactly one of endpoints or dns"),
    ({"kind": "oip", "endpoints": ["nohost"]}, "is not host:port"),
    ({"kind": "oip", "endpoints": ["a:1"], "data_path": "unary"}, "data_path: only for kind 'mesh'"),
    ({"kind": "mesh", "endpoints": ["a:1"]}, "endpoints: only for kind 'oip'"),
    ({"kind": "mesh", "model_name": "x"}, "model_name: only for kind 'oip'"),
    ({"kind": "mesh", "spill_over": {"kind": "mesh"}}, "spill_over.kind: must be 'oip'"),
    ({"kind": "openai"}, "models.m.backend.base_url: kind 'openai' needs the API's base URL"),
    ({"kind": "openai", "base_url": "ftp://h/v1"}, "models.m.backend.base_url"),
    ({"kind": "openai", "base_url": "http://h:99999/v1"}, "is not an http:// or https:// URL"),
    ({"kind": "openai", "base_url": "http://h/v1", "api": "images"}, "models.m.backend.api"),
    ({"kind": "openai", "base_url": "http://h/v1", "endpoints": ["a:1"]}, "endpoints: only for kind 'oip'"),
    ({"kind": "openai", "base_url": "http://h/v1", "tls": {"ca": "ca.pem"}}, "tls: only for an https://"),
    ({"kind": "oip", "endpoints": ["a:1"], "api_key_env": "K"}, "api_key_env: only for kind 'openai'"),
    ({"kind": "mesh", "base_url": "http://h/v1"}, "base_url: only for kind 'openai'"),
])
def test_bad_backends_name_the_path(backend, message):
    spec = {"backend": backend} if backend.get("kind") in ("oip", "openai") else {**MESH, "backend": backend}
    with pytest.raises(ConfigError) as info:
        config(m=spec)
    assert message in str(info.value)


def test_oip_model_takes_no_source():
    with pytest.raises(ConfigError, match="give no source"):
        config(m={**OIP, "source": "store://m/1"})


def test_spill_over_pool_needs_mode_auto_and_goes_to_the_serverless_pool():
    spill = {"kind": "oip", "endpoints": ["10.0.0.9:8081"]}
    with pytest.raises(ConfigError, match="needs deployment.mode 'auto'"):
        config(m={**MESH, "backend": {"spill_over": spill}})
    cfg = config(m={**MESH, "backend": {"data_path": "unary", "spill_over": spill},
                    "deployment": {"mode": "auto", "dedicated_replicas": 1}})
    [replica] = external_table(cfg)["m"]
    assert replica.pool == "serverless" and replica.kind == "oip"


def test_credentials_come_from_the_environment_at_the_entry_point():
    cfg = config(m={"backend": {**OIP["backend"], "credential": {"env": "EXT_TOKEN", "prefix": "Bearer "}}})
    assert secrets_from_env(cfg, {"EXT_TOKEN": "s3cret"}) == {"m": "s3cret"}
    with pytest.raises(Exception, match="EXT_TOKEN is not set"):
        secrets_from_env(cfg, {})


async def test_dns_names_resolve_into_the_table_and_keep_their_last_answer():
    cfg = config(m={"backend": {"kind": "oip", "dns": "kserve.default.svc:8081"}})
    answers = [["10.1.0.1:8081", "10.1.0.2:8081"], []]

    async def resolve(name):
        assert name == "kserve.default.svc:8081"
        return answers.pop(0)

    table = EndpointTable()
    source = ExternalSource(cfg, table, resolve=resolve)
    assert table.replicas("m") == ()
    await source.refresh()
    assert [r.address for r in table.replicas("m")] == ["10.1.0.1:8081", "10.1.0.2:8081"]
    await source.refresh()                              # resolution failed: keep the last addresses
    assert len(table.replicas("m")) == 2


def test_openai_backend_is_one_external_endpoint_with_its_cap_and_key():
    cfg = config(gpt={"backend": {"kind": "openai", "base_url": "https://api.example.com/v1/", "model": "gpt-4o-mini",
                                  "api_key_env": "PROVIDER_KEY", "max_inflight_per_endpoint": 8,
                                  "tls": {"ca": "/etc/ca.pem"}}}, m=MESH)
    spec = cfg.models["gpt"].backend
    assert spec.base_url == "https://api.example.com/v1" and spec.openai_api == "chat"
    assert cfg.models["gpt"].external and list(cfg.scaled_models) == ["m"]
    [replica] = external_table(cfg)["gpt"]
    assert (replica.address, replica.kind, replica.max_inflight) == ("https://api.example.com/v1", "openai", 8)
    assert secrets_from_env(cfg, {"PROVIDER_KEY": "sk-1"}) == {"gpt": "sk-1"}
    with pytest.raises(Exception, match="models.gpt.backend.api_key_env: environment variable PROVIDER_KEY"):
        secrets_from_env(cfg, {})
    with pytest.raises(ConfigError, match="kind 'openai' serves the model itself"):
        config(gpt={"source": "store://m/1", "backend": {"kind": "openai", "base_url": "http://h/v1"}})
