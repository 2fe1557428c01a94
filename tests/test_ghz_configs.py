"""Load-test assets: the ghz configs under loadtest/ghz/ and the locust users.

Every ghz config must be one ghz can run against the router: known keys of the
right types, a proto that exists (and is the one our stubs are generated from), a
call that names a method of a service in it, data that parses into the method's
input message (each message of a stream), the mesh's metadata, a duration ghz
parses and a loopback host. The requests must also make sense to the demo mesh:
models, inputs and pipelines that compose/mesh.yaml and the demo store define.

The locustfile is run for real, as locust runs it, against an in-process router
and model server (identity models, small pipelines named through its environment
overrides), and must report requests and no failures.
"""
from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
from google.protobuf import json_format, message_factory

from cmesh.config import load_config
from cmesh.manifest import parse_manifest
from meshtest import REPO, identity_text_model, mesh_config, running_router, running_server
from protos import inference_pb2, mesh_pb2
from router.auth import Authenticator
from router.metering import MemoryMeter

GHZ_DIR = REPO / "loadtest" / "ghz"
CONFIGS = sorted(GHZ_DIR.glob("*.json"))
DEMO_CONFIG = REPO / "compose" / "mesh.yaml"
# Descriptors of the protos our stubs are generated from, by proto path (the repo root
# is the proto path, so a file's descriptor name is its path from the root).
PROTOS = {module.DESCRIPTOR.name: module.DESCRIPTOR for module in (inference_pb2, mesh_pb2)}

# ghz's config file keys (runner/config.go, json tags): anything else is a typo ghz ignores.
GHZ_KEYS = {
    "proto", "protoset", "call", "cacert", "cert", "key", "skipTLS", "skipFirst", "cname", "authority",
    "insecure", "total", "async", "concurrency", "concurrency-schedule", "concurrency-start",
    "concurrency-end", "concurrency-step", "concurrency-step-duration", "concurrency-max-duration",
    "connections", "rps", "duration", "duration-stop", "max-duration", "timeout", "data", "data-file",
    "binary-file", "metadata", "metadata-file", "stream-interval", "output", "format", "connect-timeout",
    "keepalive", "cpus", "import-paths", "name", "tags", "reflect-metadata", "debug", "host",
    "enable-compression", "load-schedule", "load-start", "load-end", "load-step", "load-step-duration",
    "load-max-duration",
}
REQUIRED = {"proto": str, "call": str, "data": (dict, list), "metadata": dict, "concurrency": int,
            "rps": int, "duration": str, "host": str, "insecure": bool, "import-paths": list}
# Go's time.ParseDuration: one or more <number><unit>.
GO_DURATION = re.compile(r"^(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h)(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h))*$")
GO_UNITS_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def go_duration_s(text: str) -> float:
    assert GO_DURATION.match(text), f"{text!r} is not a Go duration (e.g. '30s', '1m30s')"
    return sum(float(n) * GO_UNITS_S[u] for n, u in re.findall(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)", text))


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def resolve_method(config: dict):
    """The MethodDescriptor that a config's `call` names in its `proto`."""
    proto = config["proto"]
    assert proto in PROTOS, f"proto {proto!r} is not one of the generated protos {sorted(PROTOS)}"
    call = config["call"]
    match = re.fullmatch(r"([\w.]+)[./](\w+)", call)
    assert match, f"call {call!r} must be 'package.Service.Method' or 'package.Service/Method'"
    service_name, method_name = match.groups()
    services = {s.full_name: s for s in PROTOS[proto].services_by_name.values()}
    assert service_name in services, f"{call!r}: no service {service_name!r} in {proto} ({sorted(services)})"
    methods = services[service_name].methods_by_name
    assert method_name in methods, f"{call!r}: {service_name} has no method {method_name!r} ({sorted(methods)})"
    return methods[method_name]


def messages(config: dict, method) -> list:
    """`data` parsed into the method's input message: one object, or (for a stream,
    or round-robin on a unary call) every element of the array."""
    data = config["data"]
    items = data if isinstance(data, list) else [data]
    assert items, "data must not be an empty array"
    cls = message_factory.GetMessageClass(method.input_type)
    parsed = []
    for i, item in enumerate(items):
        assert isinstance(item, dict), f"data[{i}] must be a JSON object (one {method.input_type.full_name})"
        parsed.append(json_format.ParseDict(item, cls()))    # raises on an unknown field or a bad value
    return parsed


def test_there_is_a_config_for_each_router_method_worth_load_testing() -> None:
    calls = {load(p)["call"].replace("/", ".") for p in CONFIGS}
    assert {"inference.GRPCInferenceService.ModelInfer", "inference.GRPCInferenceService.ModelStreamInfer",
            "cmesh.v1.Pipelines.Run"} <= calls
    infer_models = {load(p)["data"]["model_name"] for p in CONFIGS if load(p)["call"].endswith("ModelInfer")}
    assert {"embedder", "intent-classifier"} <= infer_models


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_ghz_config_keys_types_and_proto(path: Path) -> None:
    config = load(path)
    assert not set(config) - GHZ_KEYS, f"keys ghz does not know: {sorted(set(config) - GHZ_KEYS)}"
    for key, kind in REQUIRED.items():
        assert key in config, f"{path.name}: missing {key!r}"
        assert isinstance(config[key], kind), f"{path.name}: {key!r} must be {kind}"
    assert config["insecure"] is True                       # the demo router listens in plaintext
    assert all(isinstance(p, str) for p in config["import-paths"])
    # ghz resolves `proto` against its import paths; run from the repo root, "." is the root.
    assert any((REPO / p / config["proto"]).is_file() for p in config["import-paths"]), config["proto"]
    assert config["concurrency"] >= 1 and config["rps"] >= 0
    assert config.get("connections", 1) >= 1
    for key in ("duration", "timeout", "max-duration", "stream-interval", "connect-timeout"):
        if key in config:
            assert go_duration_s(config[key]) > 0, f"{path.name}: {key} must be positive"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_ghz_call_names_a_method_and_data_parses_into_its_input(path: Path) -> None:
    config = load(path)
    method = resolve_method(config)
    parsed = messages(config, method)
    if isinstance(config["data"], list) and not method.client_streaming:
        assert len(parsed) >= 1                             # ghz round-robins over the array
    if method.client_streaming:
        assert isinstance(config["data"], list), "a client/bidi stream's data is the array of its messages"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_ghz_metadata_and_host(path: Path) -> None:
    config = load(path)
    metadata = config["metadata"]
    for key, value in metadata.items():
        assert key == key.lower(), f"gRPC metadata keys are lowercase: {key!r}"
        assert isinstance(value, str), f"metadata {key!r} must be a string"
        assert not key.endswith("-bin"), "binary metadata cannot be written as a JSON string"
    assert re.fullmatch(r"Bearer \S+", metadata.get("authorization", "")), "authorization: Bearer <api key>"
    assert metadata.get("cmesh-latency-class") in ("interactive", "batch")
    assert metadata.get("cmesh-pipeline-id")
    host, _, port = config["host"].rpartition(":")
    assert host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback, config["host"]
    assert 1 <= int(port) <= 65535


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_ghz_requests_fit_the_demo_mesh(path: Path, demo_store: Path) -> None:
    """The models, inputs and pipelines named are the demo mesh's, with well-formed tensors."""
    config = load(path)
    mesh = load_config(DEMO_CONFIG)
    method = resolve_method(config)
    for request in messages(config, method):
        if isinstance(request, mesh_pb2.RunRequest):
            assert request.pipeline in mesh.pipelines, request.pipeline
            assert request.inputs.get("text", "").strip(), "a pipeline run needs inputs.text"
            assert config["metadata"]["cmesh-pipeline-id"] == request.pipeline
            assert config["metadata"]["cmesh-latency-class"] == mesh.pipelines[request.pipeline].latency_class
            continue
        assert isinstance(request, inference_pb2.ModelInferRequest), type(request)
        model = mesh.models.get(request.model_name)
        assert model is not None, f"unknown model {request.model_name!r}"
        source = model.source or next(iter(model.variants.values())).source
        manifest = parse_manifest((demo_store / source.removeprefix("store://") / "model.yaml").read_text())
        declared = {t.name: t for t in manifest.inputs}
        for tensor in request.inputs:
            assert tensor.name in declared, f"{request.model_name} has no input {tensor.name!r}"
            assert tensor.datatype == declared[tensor.name].datatype
            assert len(tensor.shape) == len(declared[tensor.name].shape)
            assert tensor.datatype == "BYTES" and len(tensor.contents.bytes_contents) == math.prod(tensor.shape)
            for element in tensor.contents.bytes_contents:   # base64 in the JSON; the text itself here
                assert element.decode("utf-8").strip()
        for key in ("cmesh-pipeline-id", "cmesh-latency-class"):
            assert request.parameters[key].string_param == config["metadata"][key]


def test_bytes_in_ghz_data_are_base64() -> None:
    config = load(GHZ_DIR / "embedder-infer.json")
    encoded = config["data"]["inputs"][0]["contents"]["bytes_contents"][0]
    assert base64.b64decode(encoded, validate=True) == b"How do I reset my password?"


# --- the locustfile, run as locust runs it --------------------------------------

LOCUST_KEY = "locust-test-key"


def summary_rows(output: str) -> dict[str, tuple[int, int]]:
    """{name: (requests, failures)} from locust's summary table."""
    rows = {}
    for line in output.splitlines():
        match = re.match(r"^(?:grpc)?\s+(.+?)\s{2,}(\d+)\s+(\d+)\(\s*[\d.]+%\)\s+\|", line)
        if match:
            rows[match.group(1).strip()] = (int(match.group(2)), int(match.group(3)))
    return rows


async def test_locustfile_runs_headless_against_a_router_and_reports_grpc_requests(tmp_path) -> None:
    source = identity_text_model(tmp_path, "echo", max_batch_size=16)
    async with running_server(mesh_config(tmp_path, {"echo": {"source": source}}), ["echo"]) as backend:
        config = mesh_config(
            tmp_path, {"echo": {"source": source, "endpoints": [f"127.0.0.1:{backend.port}"]}},
            pipelines={"echo-chat": {"latency_class": "interactive", "output": "say",
                                     "nodes": {"say": {"model": "echo", "input": "request.text"}}},
                       "echo-review": {"latency_class": "batch", "output": "say",
                                       "nodes": {"say": {"model": "echo", "input": "request.text"}}}},
            tenants={"acme": {"api_keys_env": "LOCUST_TEST_KEYS", "rate_per_s": 100000}})
        auth = Authenticator.from_env(config, {"LOCUST_TEST_KEYS": LOCUST_KEY})
        meter = MemoryMeter()
        async with running_router(config, auth=auth, meter=meter) as router:
            env = {**os.environ, "CMESH_API_KEY": LOCUST_KEY, "CMESH_LOCUST_MODELS": "echo=3,echo@batch=1",
                   "CMESH_LOCUST_PIPELINES": "echo-chat=5,echo-review@batch=1", "CMESH_LOCUST_WAIT_S": "0.05,0.2"}
            locust = Path(sys.executable).with_name("locust")
            proc = await asyncio.create_subprocess_exec(
                str(locust), "-f", "loadtest/locustfile.py", "--headless", "-u", "4", "-r", "4", "-t", "5s",
                "--host", f"http://127.0.0.1:{router.port}", "--only-summary", "--stop-timeout", "5",
                cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
                pytest.fail("locust did not exit by itself within 60 s")
            await router.core.flush_metering()
            metered = {(r.tenant, r.pipeline, r.latency_class, r.status) for r in await meter.rows()}
    output = out.decode(errors="replace")
    assert proc.returncode == 0, output[-4000:]
    rows = summary_rows(output)
    assert "Aggregated" in rows, output[-4000:]
    requests, failures = rows["Aggregated"]
    assert requests > 0 and failures == 0, output[-4000:]
    # Both user classes ran, each task reported under its method and target.
    assert {"ModelInfer echo", "Pipelines.Run echo-chat", "Pipelines.Run echo-review"} <= set(rows), rows
    # The key authenticated tenant acme; pipeline id and latency class reached the router:
    # direct calls as pipeline "locust" in the class of their user, pipeline nodes as theirs.
    # Calls locust abandons when its time limit stops the users are metered as
    # CANCELLED by the router - correctly; every other call must be OK.
    assert {row for row in metered if row[3] == "OK"} == {
        ("acme", "locust", "interactive", "OK"), ("acme", "locust", "batch", "OK"),
        ("acme", "echo-chat", "interactive", "OK"), ("acme", "echo-review", "batch", "OK")}
    assert {row[3] for row in metered} <= {"OK", "CANCELLED"}, metered
