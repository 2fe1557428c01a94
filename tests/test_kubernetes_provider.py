"""The kubernetes provider without a cluster.

The pure parts (Deployment naming, the scale patch, pod -> ReplicaHandle) are
tested on hand-written pod JSON. The API calls run against a fake API server on a
loopback port that speaks just enough of the Kubernetes REST API (list, watch
streams, the scale subresource) for kubernetes_asyncio; it records every request,
so the test also pins down which permissions the provider needs. What it cannot
show is a real API server's behaviour (admission, RBAC enforcement, watch
bookmarks, the Deployment controller creating pods): that needs a cluster.
"""
from __future__ import annotations

import asyncio
import copy
import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from autoscaler.providers import kubernetes as k8s
from cmesh.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIG = load_config(ROOT / "compose" / "mesh.yaml")
NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


def iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def make_pod(name="cmesh-model-embedder-serverless-7d9f-abcde", model="embedder", pool="serverless", *,
             phase="Running", ready=True, scheduled=True, ip="10.1.2.3", deleting=False,
             created=NOW - timedelta(seconds=30), started=NOW - timedelta(seconds=25),
             ready_at=NOW - timedelta(seconds=20), node="node-a") -> dict:
    conditions = [{"type": "PodScheduled", "status": "True" if scheduled else "False"}]
    if phase == "Running":
        conditions.append({"type": "Ready", "status": "True" if ready else "False",
                           "lastTransitionTime": iso(ready_at)})
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "cmesh", "uid": f"uid-{name}", "resourceVersion": "1",
                     "creationTimestamp": iso(created),
                     "labels": {k8s.MODEL_LABEL: model, k8s.POOL_LABEL: pool, "pod-template-hash": "7d9f"}},
        "spec": {"containers": [{"name": "model-server", "image": "cmesh:latest"}],
                 **({"nodeName": node} if scheduled else {})},
        "status": {"phase": phase, "conditions": conditions},
    }
    if phase == "Running":
        pod["status"]["podIP"] = ip
        pod["status"]["containerStatuses"] = [{"name": "model-server", "ready": ready,
                                               "state": {"running": {"startedAt": iso(started)}}}]
    if deleting:
        pod["metadata"]["deletionTimestamp"] = iso(NOW)
    return pod


# ---------------------------------------------------------------- pure parts

def test_deployment_names_follow_prefix_model_pool():
    assert k8s.deployment_name("cmesh-model-", "embedder", "serverless") == "cmesh-model-embedder-serverless"
    assert set(k8s.expected_deployments(CONFIG)) == {
        "cmesh-model-embedder-serverless", "cmesh-model-intent-classifier-serverless",
        "cmesh-model-kb-index-serverless", "cmesh-model-sql-executor-serverless",
        "cmesh-model-dialogue-llm-dedicated", "cmesh-model-dialogue-llm-serverless",
        "cmesh-model-code-llm-serverless"}
    assert k8s.expected_deployments(CONFIG)["cmesh-model-dialogue-llm-dedicated"] == ("dialogue-llm", "dedicated")


@pytest.mark.parametrize("model", ["my_model", "x" * 60, "v1.2"])
def test_deployment_name_rejects_what_kubernetes_would(model):
    with pytest.raises(ValueError, match=rf"models\.{model}: Deployment name"):
        k8s.deployment_name("cmesh-model-", model, "serverless")


def test_pools_follow_the_deployment_mode():
    assert k8s.pools_of(CONFIG.models["embedder"]) == ["serverless"]
    assert k8s.pools_of(CONFIG.models["dialogue-llm"]) == ["dedicated", "serverless"]


def test_scale_patch_touches_only_replicas():
    assert k8s.scale_patch(3) == {"spec": {"replicas": 3}}
    assert k8s.scale_patch(0) == {"spec": {"replicas": 0}}
    with pytest.raises(ValueError, match="desired"):
        k8s.scale_patch(-1)


def handle(pod):
    return k8s.pod_to_handle(pod, CONFIG, now_wall=NOW, now_mono=1000.0)


def test_ready_pod_maps_to_a_ready_replica_with_its_address():
    h = handle(make_pod())
    assert (h.id, h.model, h.pool, h.state) == ("cmesh-model-embedder-serverless-7d9f-abcde", "embedder",
                                                 "serverless", "ready")
    assert h.address == f"10.1.2.3:{CONFIG.autoscaler.kubernetes.port}"
    assert h.device == "node-a"
    assert h.started_at == pytest.approx(1000.0 - 30)       # the pod's age, on the monotonic clock
    assert h.cold_start_s == pytest.approx(5.0)             # container start -> Ready
    assert h.memory_mb == 300 and h.variants == ("default",)
    assert handle(make_pod(model="dialogue-llm", pool="dedicated")).variants == ("a", "b")


@pytest.mark.parametrize("kwargs, state", [
    ({"phase": "Pending", "scheduled": False}, "cold"),
    ({"phase": "Pending", "scheduled": True}, "warming"),
    ({"phase": "Running", "ready": False}, "warming"),
    ({"phase": "Running", "ready": True}, "ready"),
    ({"phase": "Running", "ready": True, "deleting": True}, "draining"),
    ({"phase": "Pending", "deleting": True}, "draining"),
    ({"phase": "Unknown"}, "draining"),
])
def test_pod_state(kwargs, state):
    h = handle(make_pod(**kwargs))
    assert h.state == state
    if state in ("cold", "warming"):
        assert h.cold_start_s is None           # not ready yet: nothing measured


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_finished_pods_are_gone(phase):
    assert handle(make_pod(phase=phase)) is None


def test_pods_without_cmesh_labels_are_not_replicas():
    pod = make_pod()
    del pod["metadata"]["labels"][k8s.POOL_LABEL]
    assert handle(pod) is None
    pending = handle(make_pod(phase="Pending"))
    assert pending.address is None


def test_module_imports_without_kubernetes_asyncio_and_says_what_to_install():
    code = ("import sys; sys.modules['kubernetes_asyncio'] = None\n"
            "import autoscaler.providers.kubernetes as k\n"
            "from cmesh.config import MeshConfig\n"
            "try:\n    k.KubernetesProvider(MeshConfig())\nexcept k.KubernetesUnavailable as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install kubernetes_asyncio" in out.stdout


# ---------------------------------------------------------------- a fake API server

class FakeApiServer:
    """Lists, watch streams and the Deployment scale subresource, in memory."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.objects: dict[str, dict[str, dict]] = {"pods": {}, "deployments": {}}
        self.rv = 100
        self.requests: list[dict] = []
        self.watchers: dict[str, list[asyncio.Queue]] = {"pods": [], "deployments": []}
        self.changed = asyncio.Condition()
        self.port = 0
        self._runner = None

    async def start(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._collection("pods"))
        app.router.add_get("/apis/apps/v1/namespaces/{ns}/deployments", self._collection("deployments"))
        app.router.add_patch("/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale", self._scale)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for queues in self.watchers.values():
            for q in queues:
                q.put_nowait(None)
        await self._runner.cleanup()

    # -- test side

    def put(self, kind: str, obj: dict, *, event: str | None = None) -> None:
        """Store ``obj``; send the watch event unless ``event`` is 'silent'."""
        obj = copy.deepcopy(obj)
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        name = obj["metadata"]["name"]
        kind_of_event = event or ("MODIFIED" if name in self.objects[kind] else "ADDED")
        self.objects[kind][name] = obj
        if kind_of_event != "silent":
            self._emit(kind, {"type": kind_of_event, "object": obj})

    def delete(self, kind: str, name: str) -> None:
        obj = self.objects[kind].pop(name)
        self._emit(kind, {"type": "DELETED", "object": obj})

    def expire(self, kind: str) -> None:
        """The watch's resourceVersion is too old: what an API server sends after compaction."""
        self._emit(kind, {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                      "reason": "Expired", "message": "too old", "code": 410}})

    async def wait_for(self, predicate, timeout: float = 10.0) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(predicate), timeout)

    def count(self, method: str, kind: str, *, watch: bool | None = None) -> int:
        return sum(1 for r in self.requests if r["method"] == method and r["kind"] == kind
                   and (watch is None or r["watch"] == watch))

    # -- HTTP side

    def _emit(self, kind: str, event: dict) -> None:
        for q in self.watchers[kind]:
            q.put_nowait(event)

    async def _record(self, request, kind: str, body=None) -> dict:
        entry = {"method": request.method, "path": request.path, "kind": kind,
                 "watch": request.query.get("watch", "").lower() in ("true", "1"),
                 "query": dict(request.query), "content_type": request.headers.get("Content-Type"),
                 "body": body}
        self.requests.append(entry)
        async with self.changed:
            self.changed.notify_all()
        return entry

    def _selected(self, kind: str, selector: str) -> list[dict]:
        # Only what the provider sends: one label key that must exist.
        return [o for o in self.objects[kind].values()
                if not selector or selector in (o["metadata"].get("labels") or {})]

    def _collection(self, kind: str):
        from aiohttp import web

        async def handler(request):
            entry = await self._record(request, kind)
            if request.match_info["ns"] != self.namespace:
                return web.json_response({"kind": "Status", "code": 403}, status=403)
            selector = request.query.get("labelSelector", "")
            if not entry["watch"]:
                return web.json_response({"apiVersion": "v1", "kind": "List",
                                          "metadata": {"resourceVersion": str(self.rv)},
                                          "items": self._selected(kind, selector)})
            q: asyncio.Queue = asyncio.Queue()
            self.watchers[kind].append(q)
            async with self.changed:
                self.changed.notify_all()
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            try:
                while (event := await q.get()) is not None:
                    labels = event["object"].get("metadata", {}).get("labels")
                    if labels is not None and selector and selector not in labels:
                        continue
                    await resp.write((json.dumps(event) + "\n").encode())
            finally:
                self.watchers[kind].remove(q)
            return resp
        return handler

    async def _scale(self, request):
        from aiohttp import web

        body = await request.json()
        await self._record(request, "deployments/scale", body)
        name = request.match_info["name"]
        dep = self.objects["deployments"].get(name)
        if dep is None or request.match_info["ns"] != self.namespace:
            return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                      "reason": "NotFound", "code": 404,
                                      "message": f'deployments.apps "{name}" not found'}, status=404)
        dep = copy.deepcopy(dep)
        dep["spec"]["replicas"] = body["spec"]["replicas"]
        self.put("deployments", dep)
        return web.json_response({"apiVersion": "autoscaling/v1", "kind": "Scale",
                                  "metadata": {"name": name, "namespace": self.namespace},
                                  "spec": {"replicas": dep["spec"]["replicas"]}, "status": {"replicas": 0}})


def permission_of(request: dict) -> tuple[str, str, str]:
    """(API group, resource, verb) as RBAC sees a request."""
    parts = request["path"].strip("/").split("/")
    group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
    assert rest[0] == "namespaces", request["path"]        # namespaced only: a Role suffices
    resource, name = rest[2], (rest[3] if len(rest) > 3 else None)
    if len(rest) > 4:
        resource = f"{resource}/{rest[4]}"
    verb = {"GET": "watch" if request["watch"] else ("get" if name else "list"),
            "PATCH": "patch", "PUT": "update", "POST": "create", "DELETE": "delete"}[request["method"]]
    return group, resource, verb


def deployment(name: str, model: str, pool: str, replicas: int) -> dict:
    labels = {k8s.MODEL_LABEL: model, k8s.POOL_LABEL: pool}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": "cmesh", "labels": labels},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [{"name": "model-server", "image": "cmesh:latest"}]}}}}


@pytest.fixture
async def cluster():
    pytest.importorskip("kubernetes_asyncio")
    from kubernetes_asyncio import client

    server = FakeApiServer(CONFIG.autoscaler.kubernetes.namespace)
    await server.start()
    for name, (model, pool) in k8s.expected_deployments(CONFIG).items():
        server.put("deployments", deployment(name, model, pool, 1 if pool == "dedicated" else 0))
    server.put("pods", make_pod("cmesh-model-dialogue-llm-dedicated-1", "dialogue-llm", "dedicated", ip="10.0.0.9"))
    other = make_pod("redis-5c4d", "x", "y")
    other["metadata"]["labels"] = {"app.kubernetes.io/name": "redis"}
    server.put("pods", other)
    api = client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{server.port}"))
    try:
        yield server, api
    finally:
        await api.close()
        await server.stop()


class Changes:
    """Waits on the provider's change callback, not on a timer."""

    def __init__(self, provider) -> None:
        self.event = asyncio.Event()
        self.provider = provider
        provider.subscribe(self.event.set)

    def states(self) -> dict[str, str]:
        return {h.id: h.state for h in self.provider.replicas()}

    async def until(self, predicate, timeout: float = 10.0) -> None:
        async def loop():
            while not predicate(self.states()):
                self.event.clear()
                await self.event.wait()
        await asyncio.wait_for(loop(), timeout)


async def test_provider_against_a_fake_api_server(cluster):
    server, api = cluster
    provider = k8s.KubernetesProvider(CONFIG, api, wall_clock=lambda: NOW, clock=lambda: 500.0)
    changes = Changes(provider)
    await provider.adopt(timeout_s=10)          # what the autoscaler calls once elected
    assert provider.synced.is_set()
    # Adopted at start: the running dedicated pod (the unlabelled redis pod is not selected).
    [ready] = provider.replicas()
    assert (ready.model, ready.pool, ready.state, ready.address) == \
        ("dialogue-llm", "dedicated", "ready", "10.0.0.9:8001")
    await server.wait_for(lambda: len(server.watchers["pods"]) == 1 and len(server.watchers["deployments"]) == 1)

    # scale(): one merge patch of the scale subresource, nothing else.
    await provider.scale("embedder", "serverless", 2, ["cpu0", "cpu0"])
    [patch] = [r for r in server.requests if r["method"] == "PATCH"]
    assert patch["path"] == "/apis/apps/v1/namespaces/cmesh/deployments/cmesh-model-embedder-serverless/scale"
    assert patch["content_type"].startswith("application/merge-patch+json")
    assert patch["body"] == {"spec": {"replicas": 2}}
    assert server.objects["deployments"]["cmesh-model-embedder-serverless"]["spec"]["replicas"] == 2
    await provider.scale("embedder", "serverless", 2, [])          # the loop repeats itself each tick
    assert server.count("PATCH", "deployments/scale") == 1

    # A pod's life, as the watch reports it.
    name = "cmesh-model-embedder-serverless-1"
    server.put("pods", make_pod(name, phase="Pending", scheduled=False))
    await changes.until(lambda s: s.get(name) == "cold")
    server.put("pods", make_pod(name, phase="Running", ready=False))
    await changes.until(lambda s: s.get(name) == "warming")
    server.put("pods", make_pod(name, ip="10.0.0.7"))
    await changes.until(lambda s: s.get(name) == "ready")
    assert {h.id: h.address for h in provider.replicas()}[name] == "10.0.0.7:8001"
    server.put("pods", make_pod(name, ip="10.0.0.7", deleting=True))
    await changes.until(lambda s: s.get(name) == "draining")
    server.delete("pods", name)
    await changes.until(lambda s: name not in s)

    # An external change to the Deployment (kubectl scale) is seen, so the next
    # decision patches again instead of trusting its own last patch.
    dep = copy.deepcopy(server.objects["deployments"]["cmesh-model-embedder-serverless"])
    dep["spec"]["replicas"] = 5
    server.put("deployments", dep)
    await asyncio.wait_for(_until_spec(provider, "cmesh-model-embedder-serverless", 5), 10)
    await provider.scale("embedder", "serverless", 2, [])
    assert server.count("PATCH", "deployments/scale") == 2

    # 410 Gone (compacted history): relist, and catch up on what changed meanwhile.
    lists = server.count("GET", "pods", watch=False)
    server.put("pods", make_pod("cmesh-model-code-llm-serverless-1", "code-llm"), event="silent")
    server.expire("pods")
    await changes.until(lambda s: s.get("cmesh-model-code-llm-serverless-1") == "ready")
    assert server.count("GET", "pods", watch=False) == lists + 1

    # close(): watches stop; nothing is scaled (the pods belong to the cluster).
    patches, watches = server.count("PATCH", "deployments/scale"), list(provider._tasks)
    await provider.close()
    assert watches and all(task.done() for task in watches)
    assert server.count("PATCH", "deployments/scale") == patches

    # Every request the provider made is one of API_PERMISSIONS, and each of them
    # was used: the Role in compose/k8s/ is checked against the same set.
    assert {permission_of(r) for r in server.requests} == set(k8s.API_PERMISSIONS)
    assert {r["path"].split("/")[-2] for r in server.requests if r["method"] == "PATCH"} <= \
        set(k8s.expected_deployments(CONFIG))
    assert all(r["query"].get("labelSelector") == k8s.MODEL_LABEL for r in server.requests if r["method"] == "GET")


async def _until_spec(provider, name: str, replicas: int) -> None:
    while provider._spec_replicas.get(name) != replicas:
        await asyncio.sleep(0.01)


async def test_scaling_a_missing_deployment_says_to_apply_the_manifests(cluster):
    server, api = cluster
    del server.objects["deployments"]["cmesh-model-code-llm-serverless"]
    provider = k8s.KubernetesProvider(CONFIG, api)
    try:
        with pytest.raises(RuntimeError, match=r"cmesh/cmesh-model-code-llm-serverless .*404.*compose/k8s"):
            await provider.scale("code-llm", "serverless", 1, [])
    finally:
        await provider.close()


async def test_close_before_start_is_a_no_op():
    pytest.importorskip("kubernetes_asyncio")
    provider = k8s.KubernetesProvider(CONFIG, api_client=object())
    await provider.close()
    assert provider.replicas() == []
