"""compose/: the Dockerfile, docker-compose.yml, Prometheus and Grafana, checked
statically (no Docker engine here).

Every service command goes through its entry point's real ``parse_args``, so a
renamed flag breaks this test and not a deployment; ports, hosts, env vars,
scrape targets and the dashboard's metric names are checked against each other
and against the code. What this cannot show: that the image builds (pip, the
PyTorch CPU index, the bootstrap), that the containers start and find each
other, that Grafana renders the panels. Those need `docker compose up`.
"""
from __future__ import annotations

import importlib
import inspect
import json
import posixpath
import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from prometheus_client import CollectorRegistry

from cmesh.config import load_config

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_DIR = ROOT / "compose"
COMPOSE = yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
CONFIG_PATH = "/etc/cmesh/mesh.yaml"
ENTRY_POINTS = {"router": "router.__main__", "model_server": "model_server.__main__",
                "autoscaler": "autoscaler.__main__"}
CMESH_SERVICES = {"router": "router", "model-server": "model_server", "autoscaler": "autoscaler"}
DATASOURCE_UID = "cmesh-prometheus"
# The autoscaler's metrics as agreed for it (cmesh_autoscaler_*); used until the
# autoscaler package defines its own, then the names come from there.
AUTOSCALER_METRICS = {"cmesh_autoscaler_desired_replicas": "gauge", "cmesh_autoscaler_replicas": "gauge",
                      "cmesh_autoscaler_cold_start_seconds": "gauge",
                      "cmesh_autoscaler_device_used_mb": "gauge"}


# ---------------------------------------------------------------- helpers

def parse_command(command: list[str]):
    """(module, argparse.Namespace) of ``python -m <module> ...``; every --flag must
    be one of the entry point's own (argparse would accept an abbreviation)."""
    assert command[:2] == ["python", "-m"], command
    module, argv = command[2], command[3:]
    parse_args = importlib.import_module(ENTRY_POINTS[module]).parse_args
    try:
        args = parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"`{shlex.join(command)}` does not parse with {module}'s parse_args (exit {exc.code})")
    for token in argv:
        if token.startswith("--"):
            dest = token[2:].split("=", 1)[0].replace("-", "_")
            assert dest in vars(args), f"{module}: {token} is not a flag of its own (abbreviation?)"
    return module, args


def grpc_port(module: str, args) -> int:
    return int(args.listen.rsplit(":", 1)[1]) if module == "autoscaler" else args.port


def container_ports(service: dict) -> set[int]:
    ports = set()
    for spec in service.get("ports", []):
        host, _, container = str(spec).rpartition(":")
        assert host == container, f"{spec}: publish on the same port as inside"
        ports.add(int(container))
    return ports | {int(p) for p in service.get("expose", [])}


def mounts(service: dict) -> dict[str, str]:
    """container path -> source for the service's volumes."""
    out = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        out[target] = source
    return out


def cmesh_services():
    return [pytest.param(name, module, id=name) for name, module in CMESH_SERVICES.items()]


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (COMPOSE_DIR / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip())
            for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.M)]


def exposed_names(registry: CollectorRegistry) -> dict[str, str]:
    """Every series name a registry exposes -> its family's type."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("", "_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",)}
    return {fam.name + s: fam.type for fam in registry.collect() for s in suffixes.get(fam.type, ("",))}


def code_registries() -> list[CollectorRegistry]:
    from model_server.metrics import ServerMetrics
    from router.metrics import RouterMetrics

    registries = [ServerMetrics().registry, RouterMetrics().registry]
    auto = autoscaler_registry()
    return registries + ([auto] if auto is not None else [])


def code_metrics() -> tuple[set[str], set[str]]:
    """(exact series names, family base names) the code defines; base names only
    for an autoscaler whose metrics cannot be built here."""
    exact = {name for r in code_registries() for name in exposed_names(r)}
    bases = set() if autoscaler_registry() is not None else autoscaler_base_names()
    return exact, bases


def autoscaler_registry() -> CollectorRegistry | None:
    """The registry of autoscaler.metrics, where a class there builds one with no
    arguments (as ServerMetrics and RouterMetrics do)."""
    try:
        module = importlib.import_module("autoscaler.metrics")
    except ImportError:
        return None
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if cls.__module__ != module.__name__:
            continue
        try:
            registry = getattr(cls(), "registry", None)
        except Exception:
            continue
        if isinstance(registry, CollectorRegistry) and \
                any(n.startswith("cmesh_autoscaler_") for n in exposed_names(registry)):
            return registry
    return None


def autoscaler_base_names() -> set[str]:
    found = set()
    for path in (ROOT / "autoscaler").rglob("*.py"):
        found |= set(re.findall(r"[\"'](cmesh_autoscaler_[a-z0-9_]+)[\"']", path.read_text()))
    return found or set(AUTOSCALER_METRICS)


def base_name(series: str) -> str:
    return re.sub(r"_(bucket|sum|count|total|created)$", "", series)


# ---------------------------------------------------------------- compose services

def test_the_services():
    assert set(SERVICES) == {"redis", "autoscaler", "router", "model-server", "prometheus", "grafana"}
    for name, service in SERVICES.items():
        for dep in service.get("depends_on", []):
            assert dep in SERVICES, f"{name}: depends_on {dep}"
        assert "healthcheck" in service, f"{name}: no healthcheck"


@pytest.mark.parametrize("name, module", cmesh_services())
def test_cmesh_service_command_parses_and_matches_its_ports(name, module):
    service = SERVICES[name]
    got, args = parse_command(service["command"])
    assert got == module
    assert service["image"] == "cmesh:latest"
    # The config flag names the mounted file, and that is compose/mesh.yaml.
    assert args.config == CONFIG_PATH
    source = mounts(service)[CONFIG_PATH]
    assert (COMPOSE_DIR / source).resolve() == COMPOSE_DIR / "mesh.yaml"
    # Listening on every interface of the container, on ports that are published.
    port = grpc_port(module, args)
    host = args.listen.rsplit(":", 1)[0] if module == "autoscaler" else args.host
    assert host == "0.0.0.0", f"{name}: listens on {host}, unreachable from other containers"
    assert {port, args.metrics_port} <= container_ports(service), f"{name}: ports not published/exposed"
    # The healthcheck probes the same port.
    probe = " ".join(service["healthcheck"]["test"])
    assert re.search(rf"127\.0\.0\.1'?[:,]\s*{port}\b", probe), f"{name}: healthcheck does not probe {port}"
    assert "working_dir" not in service, "the store path resolves from the image's WORKDIR"


def test_service_addresses_are_compose_service_names():
    _, router = parse_command(SERVICES["router"]["command"])
    _, autoscaler = parse_command(SERVICES["autoscaler"]["command"])
    host, port = router.autoscaler.rsplit(":", 1)
    assert host in SERVICES and int(port) == grpc_port("autoscaler", autoscaler)
    redis_port = int(SERVICES["redis"]["command"][SERVICES["redis"]["command"].index("--port") + 1])
    for name, args in (("router", router), ("autoscaler", autoscaler)):
        url = urlparse(args.redis)
        assert url.scheme == "redis" and url.hostname in SERVICES and url.port == redis_port, name
        assert SERVICES[name]["environment"]["REDIS_URL"] == args.redis, f"{name}: REDIS_URL differs from --redis"
        assert SERVICES[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    # Local replicas run inside the autoscaler's container: it advertises its own name.
    assert autoscaler.provider == "local"
    assert autoscaler.advertise_host == "autoscaler"


def test_local_replicas_listen_where_the_advertised_host_reaches_them(tmp_path):
    from autoscaler.app import make_provider

    _, args = parse_command(SERVICES["autoscaler"]["command"])
    args.state_dir = str(tmp_path)             # the entry point's default ($CMESH_STATE_DIR)
    provider = make_provider(load_config(COMPOSE_DIR / "mesh.yaml"), args)
    assert provider.advertise_host == "autoscaler"
    assert provider.host in ("0.0.0.0", "::"), f"replicas listen on {provider.host} only"


def test_mounted_config_validates_and_the_router_has_every_key_env_var():
    config = load_config(COMPOSE_DIR / "mesh.yaml")
    wanted = {t.api_keys_env for t in config.tenants.values()}
    if config.security.admin_keys_env:
        wanted.add(config.security.admin_keys_env)
    env = SERVICES["router"]["environment"]
    assert wanted and wanted <= set(env), f"router lacks {wanted - set(env)}"
    assert all(env[k] for k in wanted)


def test_every_cmesh_service_gets_the_internal_token_and_compose_has_no_default():
    """Replicas and the autoscaler demand the mesh-internal token (security.internal_token_env):
    every cmesh service must have it, from the shell, and compose must refuse to start
    without it rather than fall back to a well-known value."""
    name = load_config(COMPOSE_DIR / "mesh.yaml").security.internal_token_env
    assert name, "compose/mesh.yaml leaves the internal ports open"
    for service in CMESH_SERVICES:
        value = str(SERVICES[service].get("environment", {}).get(name, ""))
        assert value.startswith(f"${{{name}:?"), f"{service}: {name} must be required (${{{name}:?message}})"
        assert ":-" not in value and value.endswith("}"), f"{service}: no default for {name}"


def test_standalone_model_server_serves_models_of_the_config():
    config = load_config(COMPOSE_DIR / "mesh.yaml")
    _, args = parse_command(SERVICES["model-server"]["command"])
    models = args.models.split(",")
    assert models and all(m.partition(":")[0] in config.models for m in models)


# ---------------------------------------------------------------- Dockerfile

def test_dockerfile():
    steps = dockerfile_instructions()
    froms = [arg for op, arg in steps if op == "FROM"]
    assert froms == ["python:3.11-slim"]
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    install = re.search(r"pip install ([^&]*)", runs).group(1).split()
    assert "-c" in install and install[install.index("-c") + 1] == "constraints-cpu.txt"
    assert "--extra-index-url" in install and \
        install[install.index("--extra-index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    assert install[-1] == "."
    # Every COPY source exists in the build context (the repository root).
    context = (COMPOSE_DIR / SERVICES["router"]["build"]["context"]).resolve()
    assert context == ROOT
    assert (context / SERVICES["router"]["build"]["dockerfile"]).resolve() == COMPOSE_DIR / "Dockerfile"
    for op, arg in steps:
        if op == "COPY":
            for src in arg.split()[:-1]:
                assert (context / src).exists(), f"COPY {src}: not in the build context"
    user = [arg for op, arg in steps if op == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    exposed = {int(p) for op, arg in steps if op == "EXPOSE" for p in arg.split()}
    for name, module in CMESH_SERVICES.items():
        _, args = parse_command(SERVICES[name]["command"])
        assert {grpc_port(module, args), args.metrics_port} <= exposed, name
    assert json.loads([arg for op, arg in steps if op == "CMD"][-1]) == ["cmesh", "--help"]


def test_the_image_store_is_the_configs_store():
    """config.store (relative in compose/mesh.yaml) resolves from the image's
    WORKDIR to exactly where the Dockerfile bootstraps the demo store."""
    workdir, bootstrap, final_workdir = "/", None, "/"
    for op, arg in dockerfile_instructions():
        if op == "WORKDIR":
            workdir = posixpath.join(workdir, arg)
            final_workdir = workdir
        if op == "RUN" and "models bootstrap" in arg:
            words = shlex.split(arg)
            bootstrap = posixpath.normpath(posixpath.join(workdir, words[words.index("--store") + 1]))
    assert bootstrap, "the Dockerfile does not bootstrap the demo store"
    store = load_config(COMPOSE_DIR / "mesh.yaml").store
    assert posixpath.normpath(posixpath.join(final_workdir, store)) == bootstrap


# ---------------------------------------------------------------- Prometheus

def test_prometheus_scrapes_every_metrics_port():
    prom = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job.get("static_configs", [])
               for t in sc["targets"]}
    wanted = set()
    for name in CMESH_SERVICES:
        _, args = parse_command(SERVICES[name]["command"])
        wanted.add(f"{name}:{args.metrics_port}")
    assert targets == wanted
    # Replicas of the local provider: file_sd from a volume the autoscaler shares.
    [file_sd] = [sd for job in prom["scrape_configs"] for sd in job.get("file_sd_configs", [])]
    prom_mounts = mounts(SERVICES["prometheus"])
    [target_dir] = {posixpath.dirname(f) for f in file_sd["files"]}
    volume = prom_mounts[target_dir]
    assert volume in COMPOSE["volumes"] and volume in mounts(SERVICES["autoscaler"]).values()
    assert prom_mounts["/etc/prometheus/prometheus.yml"] == "./prometheus.yml"


# ---------------------------------------------------------------- Grafana

def test_grafana_provisioning_points_at_prometheus_and_the_dashboards():
    grafana = mounts(SERVICES["grafana"])
    prov = COMPOSE_DIR / grafana["/etc/grafana/provisioning"]
    [ds] = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert ds["uid"] == DATASOURCE_UID and ds["type"] == "prometheus"
    url = urlparse(ds["url"])
    assert url.hostname == "prometheus" and url.port == 9090
    assert "--web.listen-address=0.0.0.0:9090" in SERVICES["prometheus"]["command"]
    [provider] = yaml.safe_load((prov / "dashboards" / "cmesh.yml").read_text())["providers"]
    dash_dir = provider["options"]["path"]
    assert (COMPOSE_DIR / grafana[dash_dir]).resolve() == COMPOSE_DIR / "grafana" / "dashboards"
    assert SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == \
        f"{dash_dir}/cmesh.json"


def dashboard() -> dict:
    return json.loads((COMPOSE_DIR / "grafana" / "dashboards" / "cmesh.json").read_text())


def panels() -> list[dict]:
    out = []
    for p in dashboard()["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def test_dashboard_layout_and_datasources():
    dash = dashboard()
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels():
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "hwxy") and g["h"] > 0 and g["w"] > 0
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(g["x"] + dx, g["y"] + dy) for dx in range(g["w"]) for dy in range(g["h"])}
        assert not cells & mine, f"{p['title']}: overlaps another panel"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["targets"], f"{p['title']}: no queries"
        assert p["datasource"]["uid"] == DATASOURCE_UID
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
        for t in p["targets"]:
            assert t["datasource"]["uid"] == DATASOURCE_UID and t["expr"].strip()
            for open_, close in ("()", "{}", "[]"):
                assert t["expr"].count(open_) == t["expr"].count(close), t["expr"]
    variables = {v["name"] for v in dash["templating"]["list"]}
    for v in dash["templating"]["list"]:
        assert v["datasource"]["uid"] == DATASOURCE_UID
    for p in panels():
        for t in p.get("targets", []):
            used = set(re.findall(r"\$(\w+)", t["expr"])) - {"__rate_interval", "__interval", "__range"}
            assert used <= variables, f"{p['title']}: undefined variable {used - variables}"


def test_dashboard_metrics_exist_in_the_code():
    exact, bases = code_metrics()
    used = set()
    for p in panels():
        for t in p.get("targets", []):
            for name in re.findall(r"\b(cmesh_[a-z0-9_]+)", t["expr"]):
                used.add(name)
                assert name in exact or base_name(name) in bases, \
                    f"{p['title']}: {name} is not a metric the code exports"
    # The panels the mesh is run by.
    for name in ("cmesh_router_request_seconds_bucket", "cmesh_router_queue_depth", "cmesh_router_spillover_total",
                 "cmesh_router_cold_start_waits_total", "cmesh_router_breaker_state", "cmesh_router_retries_total",
                 "cmesh_router_pii_masked_total", "cmesh_model_batch_size_bucket", "cmesh_model_compute_seconds_bucket",
                 "cmesh_autoscaler_replicas", "cmesh_autoscaler_desired_replicas",
                 "cmesh_autoscaler_device_used_mb"):
        assert name in used, f"no panel shows {name}"


def test_dashboard_label_matchers_use_labels_the_metrics_have():
    """`{label=...}` matchers only name labels the code gives that metric (read
    from prometheus_client's collectors: there is no public API for label names)."""
    labels = {}
    for registry in code_registries():
        for collector in list(registry._collector_to_names):
            names = getattr(collector, "_labelnames", None)
            if names is not None:
                labels[collector._name] = set(names)
    for p in panels():
        for t in p.get("targets", []):
            for name, matchers in re.findall(r"\b(cmesh_[a-z0-9_]+)\{([^}]*)\}", t["expr"]):
                family = base_name(name)
                if family not in labels:
                    continue            # an autoscaler metric known by name only
                have = labels[family] | ({"le"} if name.endswith("_bucket") else set())
                for label in re.findall(r"(\w+)\s*[!=]~?", matchers):
                    assert label in have, f"{p['title']}: {name} has no label {label!r}"
