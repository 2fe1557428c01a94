"""`cmesh models push`: validation, atomic visibility, overwrite refusal, and a real S3
API (moto's standalone server) from which a model-server replica loads the pushed version."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from cmesh.cli import main
from cmesh.completion import COMPLETE_FILE
from cmesh.errors import NotFound
from cmesh.push import VersionExists, push_version
from cmesh.store import ModelStore
from meshtest import REPO, free_port, identity_text_model, write_config

BUCKET = "models"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server as its own process on a free loopback port, one bucket."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed")
    pytest.importorskip("s3fs", reason="s3fs is not installed")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("moto server did not start")
            time.sleep(0.1)
    try:
        ModelStore(f"s3://{BUCKET}", storage_options=_options(endpoint)).fs.mkdir(BUCKET)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _options(endpoint: str) -> dict:
    return {"endpoint_url": endpoint, "key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}


def _option_flags(endpoint: str) -> list[str]:
    return [f for k, v in _options(endpoint).items() for f in ("--store-option", f"{k}={v}")]


def _as_version(src: Path, dst: Path, version: str) -> Path:
    """A copy of a store version renamed (in its manifest too) to ``version``."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(COMPLETE_FILE))
    manifest = yaml.safe_load((dst / "model.yaml").read_text())
    manifest["version"] = version
    (dst / "model.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return dst


def _listed(store: str, *extra: str, capsys) -> list[str]:
    capsys.readouterr()
    assert main(["models", "list", "--store", store, "--json", *extra]) == 0
    return [row["model"] for row in json.loads(capsys.readouterr().out)]


def test_push_to_s3_then_a_replica_loads_it_through_the_cache(s3_endpoint, demo_store, tmp_path, capsys):
    from cmesh.client import Client
    from protos import inference_pb2 as pb

    src = _as_version(demo_store / "intent-classifier" / "1", tmp_path / "v2", "2")
    store = f"s3://{BUCKET}/e2e"
    push = ["models", "push", str(src), "--model", "intent-classifier", "--version", "2",
            "--store", store, *_option_flags(s3_endpoint)]
    assert main(push) == 0
    assert "pushed s3://models/e2e/intent-classifier/2" in capsys.readouterr().out
    assert _listed(store, *_option_flags(s3_endpoint), capsys=capsys) == ["intent-classifier/2"]

    # Pushing it again is refused; the version is untouched.
    assert main(push) == 1
    assert "intent-classifier/2 already exists" in capsys.readouterr().err

    # A real replica, its S3 endpoint and credentials from the environment as boto reads
    # them, its cache under its own working directory.
    work = tmp_path / "replica"
    work.mkdir()
    config = write_config(work / "mesh.yaml", {"store": store, "models": {"intent": {
        "variants": {"2": {"source": "store://intent-classifier/2", "weight": 1}}}}})
    env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "model_server", "--config", str(config),
                             "--models", "intent", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=work, env=env)
    try:
        ready = _ready_event(proc)
        client = Client(f"127.0.0.1:{ready['port']}")
        meta = client.stub.ModelMetadata(pb.ModelMetadataRequest(name="intent"), timeout=10)
        assert list(meta.versions) == ["2"]
        assert client.stub.ModelReady(pb.ModelReadyRequest(name="intent", version="2"), timeout=10).ready
        import numpy as np

        texts = np.array([b"Where is my order 1042?"], dtype=object)
        result = client.infer("intent", {"text": texts}, timeout=30)
        assert result.outputs["label"].reshape(-1)[0] == b"order_status"
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()
    cached = [p.parent for p in (work / ".cmesh" / "cache").glob(f"*/{COMPLETE_FILE}")]
    assert len(cached) == 1 and (cached[0] / "model.pt").stat().st_size == (src / "model.pt").stat().st_size


def _ready_event(proc: subprocess.Popen, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"model server exited early:\n{proc.stderr.read()[-4000:]}")
        if line.startswith("{") and json.loads(line).get("event") == "ready":
            return json.loads(line)
    raise AssertionError("model server did not become ready in time")


def test_a_version_without_its_marker_is_invisible_on_s3(s3_endpoint, tmp_path, capsys):
    identity_text_model(tmp_path / "src", name="echo", version="1")
    store = ModelStore(f"s3://{BUCKET}/partial", cache_dir=tmp_path / "cache",
                       storage_options=_options(s3_endpoint))
    store.fs.put_file(str(tmp_path / "src" / "echo" / "1" / "model.yaml"),
                      f"{store.version_path('echo', '1')}/model.yaml")   # a push cut short
    assert store.state("echo", "1") == "incomplete"
    assert store.versions() == []
    assert _listed(store.root, *_option_flags(s3_endpoint), capsys=capsys) == []
    with pytest.raises(NotFound, match=r"'store://echo/1' .* is not complete"):
        store.open("store://echo/1")
    # A plain push does not take over someone's unfinished upload; --force does.
    with pytest.raises(VersionExists, match="echo/1 has an incomplete upload"):
        push_version(tmp_path / "src" / "echo" / "1", store, "echo", "1")
    push_version(tmp_path / "src" / "echo" / "1", store, "echo", "1", force=True)
    assert store.versions() == [("echo", "1")]
    assert store.open("store://echo/1").local_dir.is_relative_to(tmp_path / "cache")


def test_force_replaces_a_version_and_readers_get_the_new_copy(s3_endpoint, tmp_path):
    identity_text_model(tmp_path / "a", name="echo", version="1")
    identity_text_model(tmp_path / "b", name="echo", version="1", max_batch_size=3)
    store = ModelStore(f"s3://{BUCKET}/force", cache_dir=tmp_path / "cache",
                       storage_options=_options(s3_endpoint))
    first = push_version(tmp_path / "a" / "echo" / "1", store, "echo", "1")
    assert store.open("store://echo/1").manifest.batching.max_batch_size == 8
    with pytest.raises(VersionExists, match="echo/1 already exists"):
        push_version(tmp_path / "b" / "echo" / "1", store, "echo", "1")
    second = push_version(tmp_path / "b" / "echo" / "1", store, "echo", "1", force=True)
    assert second.replaced and second.push_id != first.push_id
    # The cache is keyed by push id: the replaced version is fetched again, not served stale.
    assert store.open("store://echo/1").manifest.batching.max_batch_size == 3


async def test_a_replica_load_of_an_incomplete_version_is_not_found(tmp_path) -> None:
    import grpc

    from cmesh.client import AsyncClient
    from cmesh.errors import component_error_of
    from meshtest import mesh_config, running_server
    from protos import inference_pb2 as pb

    identity_text_model(tmp_path / "src", name="half", version="1")
    store = ModelStore("memory://push-half", cache_dir=tmp_path / "cache")
    store.fs.put_file(str(tmp_path / "src" / "half" / "1" / "model.yaml"),
                      f"{store.version_path('half', '1')}/model.yaml")
    config = mesh_config(tmp_path, {"half": {"source": "store://half/1"}},
                         server={"model_control": "explicit"})
    config.store = store.root
    async with running_server(config, []) as server:
        client = AsyncClient(f"127.0.0.1:{server.port}")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="half"), timeout=10)
        await client.close()
    err = component_error_of(info.value)
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert "'store://half/1'" in err.message and "is not complete" in err.message


# -- local stores and validation ----------------------------------------------------------


def test_push_to_a_local_store_renames_into_place_and_refuses_overwrite(tmp_path, capsys):
    identity_text_model(tmp_path / "src", name="echo", version="1")
    src = tmp_path / "src" / "echo" / "1"
    store = tmp_path / "store"
    args = ["models", "push", str(src), "--model", "echo", "--version", "1", "--store", str(store)]
    assert main(args) == 0
    assert (store / "echo" / "1" / COMPLETE_FILE).exists()
    assert [p.name for p in (store / "echo").iterdir()] == ["1"]          # no staging left behind
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "echo/1 already exists" in err and "--force" in err
    assert main([*args, "--force", "--try-load"]) == 0
    assert "replaced" in capsys.readouterr().out
    assert [p.name for p in (store / "echo").iterdir()] == ["1"]
    assert ModelStore(str(store)).versions() == [("echo", "1")]


def test_local_legacy_versions_and_staging_dirs(tmp_path):
    identity_text_model(tmp_path, name="old", version="1")           # no marker: built before markers
    identity_text_model(tmp_path, name="old", version=".2.push-x")   # a push in flight
    store = ModelStore(str(tmp_path))
    assert store.versions() == [("old", "1")]
    assert store.open("store://old/1").local_dir == tmp_path / "old" / "1"
    with pytest.raises(NotFound):
        store.open("store://old/.2.push-x")


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.pop("engine"), "engine: is required"),
    (lambda m: m["inputs"][0].update(datatype="FP99"), "inputs.0.datatype: must be one of"),
    (lambda m: m.update(version="7"), "version: is '7' but --version is '1'"),
    (lambda m: m.update(engine="no-such-engine"), "engine: unknown engine 'no-such-engine'"),
])
def test_a_bad_manifest_is_exit_2_naming_the_field(tmp_path, capsys, edit, field):
    identity_text_model(tmp_path / "src", name="echo", version="1")
    src = tmp_path / "src" / "echo" / "1"
    manifest = yaml.safe_load((src / "model.yaml").read_text())
    edit(manifest)
    (src / "model.yaml").write_text(yaml.safe_dump(manifest))
    store = tmp_path / "store"
    assert main(["models", "push", str(src), "--model", "echo", "--version", "1", "--store", str(store)]) == 2
    assert field in capsys.readouterr().err
    assert not store.exists() or ModelStore(str(store)).versions() == []


def test_bad_names_and_a_failed_dry_run_load_are_exit_2(tmp_path, capsys):
    identity_text_model(tmp_path / "src", name="echo", version="1")
    src = tmp_path / "src" / "echo" / "1"
    store = tmp_path / "store"
    assert main(["models", "push", str(src), "--model", "../x", "--version", "1", "--store", str(store)]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["models", "push", str(tmp_path / "nowhere"), "--model", "echo", "--version", "1",
                 "--store", str(store)]) == 2
    assert "not a directory" in capsys.readouterr().err
    model_dir = tmp_path / "torch-src"
    model_dir.mkdir()
    (model_dir / "model.yaml").write_text(yaml.safe_dump({
        "name": "ts", "version": "1", "engine": "torch",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]}))
    assert main(["models", "push", str(model_dir), "--model", "ts", "--version", "1", "--store", str(store),
                 "--try-load"]) == 2                                  # no TorchScript file to load
    assert "the 'torch' engine cannot load it" in capsys.readouterr().err
    assert not (store / "ts").exists()


def test_store_option_flags_parse_yaml_values():
    from cmesh.cli.push import store_options

    assert store_options(["endpoint_url=http://h:1", "anon=true", "client_kwargs={region_name: x}"]) == {
        "endpoint_url": "http://h:1", "anon": True, "client_kwargs": {"region_name": "x"}}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        store_options(["nope"])
