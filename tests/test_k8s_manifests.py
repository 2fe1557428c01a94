"""compose/k8s/: the Kubernetes manifests, checked statically (no cluster here).

Every object validates against the Kubernetes OpenAPI schemas that
kubernetes-validate bundles (strict: unknown fields fail), with the network
blocked so the check is truly offline. The manifests are also checked against
the config and the code: one model-server Deployment per model and pool under
the name and labels the kubernetes provider uses, container args that parse
with each entry point's parse_args, probes on the ports the args choose, drain
timing that fits the grace period, and a Role that grants exactly the requests
the provider makes. What this cannot show: that the API server admits them
(admission webhooks, quotas, a gRPC-probe-capable kubelet: 1.27+), that pods
schedule, pull the image and become ready.
"""
from __future__ import annotations

import importlib
import posixpath
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from autoscaler.providers.kubernetes import API_PERMISSIONS, MODEL_LABEL, POOL_LABEL, expected_deployments
from cmesh.config import load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
K8S_DIR = ROOT / "compose" / "k8s"
MESH_YAML = ROOT / "compose" / "mesh.yaml"
CONFIG = load_config(MESH_YAML)
KCFG = CONFIG.autoscaler.kubernetes
K8S_VERSION = "1.33"          # a version kubernetes-validate bundles; gRPC probes are GA since 1.27
ENTRY_POINTS = {"router": "router.__main__", "model_server": "model_server.__main__",
                "autoscaler": "autoscaler.__main__"}
CLUSTER_SCOPED = {"Namespace"}


def load_docs() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        docs.extend((path.name, d) for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


DOCS = load_docs()


def objects(kind: str) -> list[dict]:
    return [d for _, d in DOCS if d["kind"] == kind]


def one(kind: str, name: str) -> dict:
    [obj] = [d for d in objects(kind) if d["metadata"]["name"] == name]
    return obj


def container(deployment: dict) -> dict:
    [c] = deployment["spec"]["template"]["spec"]["containers"]
    return c


def parse_container(c: dict):
    """(module, Namespace) from a container's command + args, through the entry
    point's parse_args; every --flag must be one of its own."""
    argv = list(c.get("command", [])) + list(c.get("args", []))
    assert argv[:2] == ["python", "-m"], argv
    module = argv[2]
    try:
        args = importlib.import_module(ENTRY_POINTS[module]).parse_args(argv[3:])
    except SystemExit as exc:
        pytest.fail(f"{c['name']}: {argv} does not parse with {module}'s parse_args (exit {exc.code})")
    for token in argv[3:]:
        if token.startswith("--"):
            assert token[2:].split("=", 1)[0].replace("-", "_") in vars(args), f"{c['name']}: unknown flag {token}"
    return module, args


def model_server_deployments() -> list[dict]:
    return [d for d in objects("Deployment") if MODEL_LABEL in d["metadata"].get("labels", {})]


def port_number(c: dict, port) -> int:
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in c["ports"] if p["name"] == port]
    assert len(named) == 1, f"{c['name']}: no container port named {port!r}"
    return named[0]


def config_mount_path(deployment: dict) -> str:
    """Where the cmesh-config ConfigMap's mesh.yaml lands in the container."""
    spec = deployment["spec"]["template"]["spec"]
    [volume] = [v["name"] for v in spec["volumes"] if v.get("configMap", {}).get("name") == "cmesh-config"]
    [mount] = [m for m in container(deployment)["volumeMounts"] if m["name"] == volume]
    assert mount.get("readOnly") is True
    return posixpath.join(mount["mountPath"], "mesh.yaml")


# ---------------------------------------------------------------- schemas

def test_every_manifest_validates_offline_against_the_kubernetes_schemas(monkeypatch):
    kv = pytest.importorskip("kubernetes_validate")
    from kubernetes_validate.utils import all_versions, major_minor

    assert K8S_VERSION in {major_minor(v) for v in all_versions()}, "pick a version kubernetes-validate bundles"

    def no_network(*args, **kwargs):
        raise AssertionError("kubernetes-validate tried the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert len(DOCS) >= 15
    for name, doc in DOCS:
        try:
            assert kv.validate(doc, K8S_VERSION, strict=True) == K8S_VERSION
        except kv.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")
    # The validator is not a no-op: a typo and a wrong type are rejected.
    bad = yaml.safe_load(yaml.safe_dump(model_server_deployments()[0]))
    container(bad)["readinessProbe"]["grpc"]["portt"] = 8001
    with pytest.raises(kv.ValidationError, match="portt"):
        kv.validate(bad, K8S_VERSION, strict=True)
    bad = yaml.safe_load(yaml.safe_dump(model_server_deployments()[0]))
    bad["spec"]["replicas"] = "zero"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)


def test_everything_lives_in_the_configured_namespace():
    assert [n["metadata"]["name"] for n in objects("Namespace")] == [KCFG.namespace]
    for name, doc in DOCS:
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"].get("namespace") == KCFG.namespace, f"{name}: {doc['kind']}"
    names = [(d["kind"], d["metadata"]["name"]) for _, d in DOCS]
    assert len(names) == len(set(names))


# ---------------------------------------------------------------- config

def test_configmap_is_compose_mesh_yaml():
    data = one("ConfigMap", "cmesh-config")["data"]
    assert set(data) == {"mesh.yaml"}
    # An exact copy, no overrides: Kubernetes differences are flags in the Deployments.
    assert data["mesh.yaml"] == MESH_YAML.read_text(), \
        "compose/k8s/10-configmap.yaml is out of date: copy compose/mesh.yaml into data.mesh.yaml"
    parse_config(yaml.safe_load(data["mesh.yaml"]), source="configmap cmesh-config")


def test_cmesh_pods_run_the_configured_image_and_read_the_configmap():
    for d in objects("Deployment"):
        c = container(d)
        if d["metadata"]["name"] == "redis":
            continue
        assert c["image"] == KCFG.image and c["imagePullPolicy"] == "IfNotPresent"
        _, args = parse_container(c)
        assert args.config == config_mount_path(d)
        assert "workingDir" not in c, "the store path resolves from the image's WORKDIR"
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == dockerfile_uid()
        annotations = d["spec"]["template"]["metadata"].get("annotations", {})
        assert int(annotations["prometheus.io/port"]) == args.metrics_port
        assert args.metrics_port in {p["containerPort"] for p in c["ports"]}


def dockerfile_uid() -> int:
    users = re.findall(r"^USER\s+(\S+)", (ROOT / "compose" / "Dockerfile").read_text(), re.M)
    return int(users[-1].split(":")[0])


# ---------------------------------------------------------------- model servers

def test_one_deployment_per_model_and_pool():
    expected = expected_deployments(CONFIG)
    found = {d["metadata"]["name"]: d for d in model_server_deployments()}
    assert set(found) == set(expected), "compose/k8s/50-model-servers.yaml does not match the config's models"
    for name, (model, pool) in expected.items():
        d = found[name]
        labels = {MODEL_LABEL: model, POOL_LABEL: pool}
        assert labels.items() <= d["metadata"]["labels"].items()
        assert d["spec"]["selector"]["matchLabels"] == labels
        assert labels.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        spec = CONFIG.models[model]
        want = spec.deployment.dedicated_replicas if pool == "dedicated" else 0
        assert d["spec"]["replicas"] == want, f"{name}: serverless pools start at 0, dedicated at its size"


@pytest.mark.parametrize("name", sorted(expected_deployments(CONFIG)))
def test_model_server_container(name):
    d = one("Deployment", name)
    model, _ = expected_deployments(CONFIG)[name]
    c = container(d)
    module, args = parse_container(c)
    assert module == "model_server"
    assert args.models == model
    assert args.host == "0.0.0.0" and args.port == KCFG.port   # the provider's address = podIP:port
    assert {args.port, args.metrics_port} <= {p["containerPort"] for p in c["ports"]}
    # Ready = the model server's grpc.health.v1 (NOT_SERVING while loading and draining).
    assert port_number(c, c["readinessProbe"]["grpc"]["port"]) == args.port
    assert "grpc" not in c.get("livenessProbe", {}), "liveness must not fail while models load"
    # Drain: preStop sleep (routers drop it), then drain_delay_s + drain_grace_s.
    sleep = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and int(sleep[1]) > 0
    grace = d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    server = CONFIG.server
    assert grace >= int(sleep[1]) + server.drain_delay_s + server.drain_grace_s
    assert grace >= CONFIG.autoscaler.drain_grace_s
    memory = c["resources"]["requests"]["memory"]
    assert memory.endswith("Mi") and int(memory[:-2]) >= (CONFIG.models[model].resources.memory_mb or 0)
    assert d["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


# ---------------------------------------------------------------- router, autoscaler, redis

def service_for(host: str, port: int) -> dict:
    """The Service a host:port names, checked to reach a container port of a Deployment."""
    services = [s for s in objects("Service") if s["metadata"]["name"] == host]
    assert len(services) == 1, f"no Service {host!r}"
    ports = [p for p in services[0]["spec"]["ports"] if p["port"] == port]
    assert len(ports) == 1, f"Service {host} has no port {port}"
    sp, selector = ports[0], services[0]["spec"]["selector"]
    pods = [d for d in objects("Deployment")
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
    assert len(pods) == 1, f"Service {host} selects {len(pods)} Deployments"
    d = pods[0]
    assert port_number(container(d), sp["targetPort"]) in {p["containerPort"] for p in container(d)["ports"]}
    return d


def test_services_reach_their_pods():
    for svc in objects("Service"):
        for sp in svc["spec"]["ports"]:
            service_for(svc["metadata"]["name"], sp["port"])


def test_router():
    d = one("Deployment", "router")
    c = container(d)
    module, args = parse_container(c)
    assert module == "router" and args.host == "0.0.0.0"
    assert port_number(c, c["readinessProbe"]["grpc"]["port"]) == args.port
    # --autoscaler and --redis name Services that reach the right pods and ports.
    host, port = args.autoscaler.rsplit(":", 1)
    _, autoscaler = parse_container(container(service_for(host, int(port))))
    assert int(port) == int(autoscaler.listen.rsplit(":", 1)[1])
    url = urlparse(args.redis)
    service_for(url.hostname, url.port)
    env = {e["name"]: e for e in c["env"]}
    assert env["REDIS_URL"]["value"] == args.redis
    # Every key env var the config names comes from a Secret that has that key.
    wanted = {t.api_keys_env for t in CONFIG.tenants.values()} | {CONFIG.security.admin_keys_env} - {None}
    for var in wanted:
        ref = env[var]["valueFrom"]["secretKeyRef"]
        secret = one("Secret", ref["name"])
        assert ref["key"] in secret.get("stringData", {}) | secret.get("data", {})
    hpa = one("HorizontalPodAutoscaler", "router")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "router"}
    assert "replicas" not in d["spec"], "the HPA owns the router's replica count"


def test_autoscaler_uses_the_kubernetes_provider():
    d = one("Deployment", "autoscaler")
    c = container(d)
    module, args = parse_container(c)
    assert module == "autoscaler" and args.provider == "kubernetes"
    assert args.listen.startswith("0.0.0.0:")
    url = urlparse(args.redis)
    service_for(url.hostname, url.port)
    assert d["spec"]["replicas"] == 1


def rbac_of(service_account: str) -> set[tuple[str, str, str]]:
    """(group, resource, verb) the ServiceAccount may use, through its RoleBindings."""
    granted = set()
    for binding in objects("RoleBinding"):
        subjects = {(s["kind"], s["name"], s.get("namespace")) for s in binding["subjects"]}
        if ("ServiceAccount", service_account, KCFG.namespace) not in subjects:
            continue
        assert binding["roleRef"]["kind"] == "Role"
        role = one("Role", binding["roleRef"]["name"])
        for rule in role["rules"]:
            granted |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return granted


def test_rbac_allows_exactly_what_the_kubernetes_provider_calls():
    d = one("Deployment", "autoscaler")
    sa = d["spec"]["template"]["spec"]["serviceAccountName"]
    one("ServiceAccount", sa)
    assert rbac_of(sa) == set(API_PERMISSIONS)
    assert not objects("ClusterRole") and not objects("ClusterRoleBinding"), "namespaced access only"
    # Patching the scale subresource is limited to the model-server Deployments.
    [rule] = [r for b in objects("Role") for r in b["rules"] if "deployments/scale" in r["resources"]]
    assert sorted(rule["resourceNames"]) == sorted(expected_deployments(CONFIG))
    assert "*" not in str([r for b in objects("Role") for r in b["rules"]])
    # Nothing else may talk to the API server.
    for other in objects("Deployment"):
        if other is not d:
            assert other["spec"]["template"]["spec"].get("automountServiceAccountToken") is False, \
                other["metadata"]["name"]


# ---------------------------------------------------------------- internal ports

def cmesh_deployments() -> list[dict]:
    return [d for d in objects("Deployment") if d["metadata"]["name"] != "redis"]


def test_every_cmesh_pod_gets_the_internal_token_from_a_secret_the_repository_does_not_hold():
    name = CONFIG.security.internal_token_env
    assert name, "mesh.yaml leaves the internal ports open"
    refs = set()
    for d in cmesh_deployments():
        env = {e["name"]: e for e in container(d).get("env", [])}
        assert name in env, f"{d['metadata']['name']}: no {name}"
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref.get("optional") is not True, "a replica without the token must not start open"
        refs.add((ref["name"], ref["key"]))
    assert len(refs) == 1, f"one token for the whole mesh, got {refs}"
    [(secret, _)] = refs
    # A token in the repository is public: the Secret is created at install (00-namespace.yaml says how).
    assert not [s for s in objects("Secret") if s["metadata"]["name"] == secret]
    assert f"create secret generic {secret}" in (K8S_DIR / "00-namespace.yaml").read_text()


def pod_labels(d: dict) -> dict:
    return d["spec"]["template"]["metadata"]["labels"]


def selected(selector: dict) -> set[str]:
    """Names of the Deployments whose pods a (matchLabels-only) podSelector selects."""
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are checked here"
    want = selector.get("matchLabels", {})
    return {d["metadata"]["name"] for d in objects("Deployment") if want.items() <= pod_labels(d).items()}


def policy_for(deployments: set[str]) -> dict:
    [policy] = [p for p in objects("NetworkPolicy") if selected(p["spec"]["podSelector"]) == deployments]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    return policy


def allowed(policy: dict, d: dict) -> dict[int, set[str]]:
    """Container port of ``d`` -> the peers allowed to reach it: Deployment names for
    pod selectors in this namespace, 'prometheus' for the Prometheus rule."""
    out: dict[int, set[str]] = {}
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "a rule without `from` admits everyone"
        peers = set()
        for peer in rule["from"]:
            assert "ipBlock" not in peer, "no address ranges: peers are pods"
            if "namespaceSelector" in peer:
                assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
                peers.add("prometheus")
            else:
                found = selected(peer["podSelector"])
                assert found, f"{peer} selects no Deployment"
                peers |= found
        for port in rule["ports"]:
            assert port["protocol"] == "TCP"
            out.setdefault(port_number(container(d), port["port"]), set()).update(peers)
    return out


def test_replica_ports_admit_only_routers_and_the_autoscaler():
    replicas = {d["metadata"]["name"] for d in model_server_deployments()}
    policy = policy_for(replicas)                         # every model-server pod, nothing else
    for name in replicas:
        d = one("Deployment", name)
        _, args = parse_container(container(d))
        assert allowed(policy, d) == {args.port: {"router", "autoscaler"}, args.metrics_port: {"prometheus"}}


def test_the_autoscaler_admits_only_routers():
    d = one("Deployment", "autoscaler")
    _, args = parse_container(container(d))
    grpc_port = int(args.listen.rsplit(":", 1)[1])
    assert allowed(policy_for({"autoscaler"}), d) == {grpc_port: {"router"}, args.metrics_port: {"prometheus"}}


def test_redis_admits_only_routers_and_the_autoscaler():
    d = one("Deployment", "redis")
    assert allowed(policy_for({"redis"}), d) == {6379: {"router", "autoscaler"}}


def test_the_router_stays_open_and_every_policy_selects_pods():
    for policy in objects("NetworkPolicy"):
        assert selected(policy["spec"]["podSelector"]), policy["metadata"]["name"]
        assert "router" not in selected(policy["spec"]["podSelector"]), "the router is the front door"
    # The probes that cannot authenticate are the kubelet's (node traffic: not subject to policies)
    # and use grpc.health.v1, which replicas leave open.
    for d in model_server_deployments():
        assert "grpc" in container(d)["readinessProbe"]
