"""The ``kubernetes`` provider: replicas are pods of one Deployment per model and pool.

The control loop's ``scale()`` becomes a patch of the Deployment's scale
subresource; the cluster starts, schedules, probes and stops pods. What the loop
sees (``replicas()``) comes from a pod watch: phase, the Ready condition (the
model server's gRPC health, probed by the kubelet) and ``deletionTimestamp``
(terminating pods drain) map to the provider states of ``base.STATES``.

Everything that does not talk to the API server is a pure function at the top
(naming, patch body, pod -> ReplicaHandle), so it is tested without a cluster.
``kubernetes_asyncio`` is imported only when the provider is built, so the
autoscaler runs without it when the local provider is chosen.

The manifests this provider expects are ``compose/k8s/``: Deployments named
``<deployment_prefix><model>-<pool>`` labelled ``cmesh.io/model`` and
``cmesh.io/pool``, and a Role that allows exactly ``API_PERMISSIONS``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from autoscaler.providers.base import ReplicaHandle
from cmesh.config import MeshConfig, ModelConfig

log = logging.getLogger(__name__)

MODEL_LABEL = "cmesh.io/model"
POOL_LABEL = "cmesh.io/pool"
CONTAINER = "model-server"          # the model server's container name in the pod template
MERGE_PATCH = "application/merge-patch+json"
WATCH_TIMEOUT_S = 300               # server-side; the loop relists after each, like an informer resync
REQUEST_TIMEOUT_S = 30.0            # client-side, so a dead connection cannot hang a call (or a watch)
MAX_BACKOFF_S = 30.0

# (API group, resource, verb) for every request this provider makes. The Role in
# compose/k8s/ must grant exactly these; tests check both sides (the recorded
# requests against a fake API server, and the Role against this set).
API_PERMISSIONS = frozenset({
    ("apps", "deployments", "list"),         # which Deployments exist, their spec.replicas
    ("apps", "deployments", "watch"),
    ("apps", "deployments/scale", "patch"),  # scale(): the scale subresource only
    ("", "pods", "list"),                    # replicas(): pod phase, readiness, IP
    ("", "pods", "watch"),
})

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class KubernetesUnavailable(RuntimeError):
    """The kubernetes provider was chosen but cannot run here."""


def _require_kubernetes():
    try:
        from kubernetes_asyncio import client, config, watch
    except ImportError as exc:
        raise KubernetesUnavailable(
            "autoscaler.provider 'kubernetes' needs the kubernetes_asyncio package: "
            "pip install kubernetes_asyncio (or choose --provider local)") from exc
    return client, config, watch


# ---------------------------------------------------------------- pure parts

def pools_of(model: ModelConfig) -> list[str]:
    """The pools a model's deployment mode implies, hence its Deployments."""
    mode = model.deployment.mode
    return {"dedicated": ["dedicated"], "serverless": ["serverless"],
            "auto": ["dedicated", "serverless"]}[mode]


def deployment_name(prefix: str, model: str, pool: str) -> str:
    """``<prefix><model>-<pool>``; model names allow ``_`` and ``.`` but Kubernetes
    object names that become pod-name prefixes must be DNS labels, so say so early."""
    name = f"{prefix}{model}-{pool}"
    if len(name) > 63 or not _DNS_LABEL.match(name):
        raise ValueError(f"models.{model}: Deployment name {name!r} is not a valid Kubernetes name "
                         "(lowercase letters, digits and '-', at most 63 characters)")
    return name


def expected_deployments(config: MeshConfig) -> dict[str, tuple[str, str]]:
    """Deployment name -> (model, pool) for every model and pool of the config."""
    prefix = config.autoscaler.kubernetes.deployment_prefix
    return {deployment_name(prefix, model, pool): (model, pool)
            for model, spec in config.scaled_models.items() for pool in pools_of(spec)}


def scale_patch(desired: int) -> dict:
    """Merge-patch body for ``deployments/<name>/scale``: only the replica count,
    so nothing else of the Deployment is touched (and RBAC need not allow it)."""
    if desired < 0:
        raise ValueError(f"desired: must be >= 0, got {desired}")
    return {"spec": {"replicas": int(desired)}}


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _condition(status: dict, kind: str) -> dict | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == kind:
            return cond
    return None


def pod_state(pod: dict) -> str | None:
    """A pod's provider state, or None when it is gone (finished or failed)."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    if phase in ("Succeeded", "Failed"):
        return None
    if meta.get("deletionTimestamp"):
        return "draining"          # terminating: out of the endpoint table, preStop + SIGTERM drain
    if phase == "Unknown":
        # The node stopped reporting. Not capacity the loop may count on, and not
        # routable; the cluster replaces it once it evicts it.
        return "draining"
    ready = _condition(status, "Ready")
    if phase == "Running" and ready is not None and ready.get("status") == "True":
        return "ready"
    scheduled = _condition(status, "PodScheduled")
    if phase == "Pending" and not (scheduled and scheduled.get("status") == "True"):
        return "cold"              # asked for, not placed on a node yet
    return "warming"               # image pull, process start, model loading


def _cold_start_s(status: dict) -> float | None:
    """Container start -> Ready: the kubelet's view of the replica's own cold start
    (granular to the readiness probe period)."""
    ready = _condition(status, "Ready")
    if not ready or ready.get("status") != "True":
        return None
    statuses = status.get("containerStatuses") or []
    chosen = next((c for c in statuses if c.get("name") == CONTAINER), statuses[0] if statuses else None)
    started = _parse_time(((chosen or {}).get("state") or {}).get("running", {}).get("startedAt"))
    became_ready = _parse_time(ready.get("lastTransitionTime"))
    if started is None or became_ready is None:
        return None
    return max(0.0, (became_ready - started).total_seconds())


def pod_to_handle(pod: dict, config: MeshConfig, *, now_wall: datetime, now_mono: float) -> ReplicaHandle | None:
    """A pod (the API's JSON shape) as a ReplicaHandle; None for pods that are not
    replicas (no cmesh labels) or are gone."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    labels = meta.get("labels") or {}
    model, pool = labels.get(MODEL_LABEL), labels.get(POOL_LABEL)
    state = pod_state(pod)
    if not model or not pool or state is None:
        return None
    ip = status.get("podIP")
    created = _parse_time(meta.get("creationTimestamp"))
    # The loop measures ages on the monotonic clock; carry the pod's age over.
    age = max(0.0, (now_wall - created).total_seconds()) if created else 0.0
    spec = config.models.get(model)
    return ReplicaHandle(
        id=meta.get("name", ""),
        model=model,
        pool=pool,
        device=(pod.get("spec") or {}).get("nodeName") or "",
        state=state,
        address=f"{ip}:{config.autoscaler.kubernetes.port}" if ip else None,
        started_at=now_mono - age,
        cold_start_s=_cold_start_s(status),
        variants=tuple(spec.variant_sources()) if spec else (),
        memory_mb=(spec.resources.memory_mb or 0) if spec else 0,
        info={"pod": meta.get("name", ""), "uid": meta.get("uid", ""),
              "phase": status.get("phase", ""), "node": (pod.get("spec") or {}).get("nodeName", "")},
    )


def _same(a: ReplicaHandle | None, b: ReplicaHandle | None) -> bool:
    if a is None or b is None:
        return a is b
    return (a.state, a.address, a.device, a.cold_start_s, a.info) == \
        (b.state, b.address, b.device, b.cold_start_s, b.info)


# ---------------------------------------------------------------- the provider

class KubernetesProvider:
    """Provider over the Kubernetes API (``apps/v1`` Deployments, ``v1`` pods).

    ``api_client``: a ``kubernetes_asyncio.client.ApiClient`` to use (and not close);
    None loads the in-cluster service account, else ``~/.kube/config``."""

    def __init__(self, config: MeshConfig, api_client: Any = None, *,
                 wall_clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._k8s_client, self._k8s_config, self._k8s_watch = _require_kubernetes()
        self.config = config
        self.namespace = config.autoscaler.kubernetes.namespace
        self._api = api_client
        self._owns_api = api_client is None
        self._wall, self._clock = wall_clock, clock
        self._pods: dict[str, ReplicaHandle] = {}
        self._spec_replicas: dict[str, int] = {}    # Deployment -> spec.replicas, as watched
        self._callbacks: list[Callable[[], None]] = []
        self._tasks: list[asyncio.Task] = []
        self._start_lock = asyncio.Lock()
        self._closed = False
        self.synced = asyncio.Event()               # set once the first pod list is in

    # -- Provider protocol

    def replicas(self) -> list[ReplicaHandle]:
        return list(self._pods.values())

    async def scale(self, model: str, pool: str, desired: int, devices: list[str]) -> None:
        # devices: placement is the scheduler's job here; the choice is ignored.
        await self.start()
        name = deployment_name(self.config.autoscaler.kubernetes.deployment_prefix, model, pool)
        body = scale_patch(desired)
        if self._spec_replicas.get(name) == desired:
            return                      # the loop asks every tick; patch only on a change
        apps = self._k8s_client.AppsV1Api(self._api)
        try:
            await apps.patch_namespaced_deployment_scale(name, self.namespace, body, _content_type=MERGE_PATCH,
                                                         _request_timeout=REQUEST_TIMEOUT_S)
        except self._k8s_client.ApiException as exc:
            hint = " (apply compose/k8s/: one Deployment per model and pool)" if exc.status == 404 else ""
            raise RuntimeError(f"cannot scale Deployment {self.namespace}/{name} to {desired}: "
                               f"{exc.status} {exc.reason}{hint}") from None
        self._spec_replicas[name] = desired
        log.info("scaled %s/%s to %d", self.namespace, name, desired)

    def apply(self, config: MeshConfig, config_path: str = "", config_id: str = "") -> None:
        """An applied config: scaling follows it (counts, modes through the policy,
        removed models to zero). Pod templates are the cluster's: a version switch
        here is a ConfigMap update and a Deployment rollout (``kubectl apply -f
        compose/k8s/``), which the kubelet rolls; this provider does not rewrite them."""
        from autoscaler.generations import generation

        changed = [m for m in config.scaled_models if m in self.config.scaled_models
                   and generation(config, m) != generation(self.config, m)]
        if changed:
            log.warning("models %s now load something else: roll their Deployments (kubectl apply) to switch "
                        "versions on Kubernetes", ", ".join(sorted(changed)))
        self.config = config

    def subscribe(self, callback: Callable[[], None]) -> None:
        # Watching starts with adopt() (on election) or the first scale(), so a
        # standby autoscaler does not hold watches it has no use for.
        self._callbacks.append(callback)

    async def close(self) -> None:
        """Stop watching. Pods belong to the cluster: nothing is scaled down."""
        self._closed = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._owns_api and self._api is not None:
            await self._api.close()
            self._api = None

    async def adopt(self, timeout_s: float = 30.0) -> None:
        """On election: start watching and wait for the first pod list, so the
        loop's first decision counts the pods that already run."""
        await self.start()
        try:
            await asyncio.wait_for(self.synced.wait(), timeout_s)
        except asyncio.TimeoutError:
            log.warning("no pod list from the API server within %.0fs; deciding without it", timeout_s)

    # -- watches

    async def start(self) -> None:
        """Connect and start the pod and Deployment watches (idempotent)."""
        async with self._start_lock:
            if self._tasks or self._closed:
                return
            if self._api is None:
                self._api = await self._connect()
            core = self._k8s_client.CoreV1Api(self._api)
            apps = self._k8s_client.AppsV1Api(self._api)
            self._tasks = [
                asyncio.create_task(self._watch("pods", core.list_namespaced_pod, self._on_pods)),
                asyncio.create_task(self._watch("deployments", apps.list_namespaced_deployment,
                                                self._on_deployments)),
            ]

    async def _connect(self):
        try:
            self._k8s_config.load_incluster_config()        # the autoscaler's service account
        except self._k8s_config.ConfigException:
            try:
                await self._k8s_config.load_kube_config()   # a developer's kubeconfig
            except (self._k8s_config.ConfigException, OSError) as exc:
                raise KubernetesUnavailable(
                    "no Kubernetes credentials: not in a pod with a service account and no usable "
                    f"kubeconfig ({exc}); run the autoscaler in the cluster (compose/k8s/) or set KUBECONFIG"
                ) from None
        return self._k8s_client.ApiClient()

    async def _watch(self, kind: str, list_fn, apply: Callable[[str, dict | None, list[dict]], None]) -> None:
        """List, then watch from the list's resourceVersion; relist after the
        server-side timeout, a 410 Gone or an error (with backoff)."""
        backoff = 0.5
        while not self._closed:
            try:
                listing = await self._list(list_fn)
                apply("SYNC", None, listing.get("items") or [])
                if kind == "pods":
                    self.synced.set()
                # return_type "object": events stay the API's JSON (raw_object), so a
                # field the client's models do not know, or miss, cannot break the watch.
                stream = self._k8s_watch.Watch(return_type="object")
                async with stream.stream(list_fn, self.namespace, label_selector=MODEL_LABEL,
                                         resource_version=listing["metadata"]["resourceVersion"],
                                         timeout_seconds=WATCH_TIMEOUT_S,
                                         _request_timeout=WATCH_TIMEOUT_S + REQUEST_TIMEOUT_S) as events:
                    async for event in events:
                        if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                            apply(event["type"], event["raw_object"], [])
                backoff = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:     # API server restarts, 410 Gone, network: relist
                if getattr(exc, "status", None) != 410:
                    log.warning("watching %s in %s failed (%s); relisting in %.1fs",
                                kind, self.namespace, exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(MAX_BACKOFF_S, backoff * 2)

    async def _list(self, list_fn) -> dict:
        """The list as the API's JSON (same reason as the watch's return_type)."""
        resp = await list_fn(self.namespace, label_selector=MODEL_LABEL, _preload_content=False,
                             _request_timeout=REQUEST_TIMEOUT_S)
        try:
            body = await resp.read()
        finally:
            resp.release()
        if not 200 <= resp.status < 300:
            raise self._k8s_client.ApiException(status=resp.status, reason=resp.reason)
        return json.loads(body)

    def _on_pods(self, kind: str, pod: dict | None, items: list[dict]) -> None:
        now_wall, now_mono = self._wall(), self._clock()
        if kind == "SYNC":
            fresh = {}
            for item in items:
                handle = pod_to_handle(item, self.config, now_wall=now_wall, now_mono=now_mono)
                if handle is not None:
                    fresh[handle.id] = self._keep_start(handle)
            changed = fresh.keys() != self._pods.keys() or \
                any(not _same(self._pods[k], v) for k, v in fresh.items())
            self._pods = fresh
        else:
            name = (pod.get("metadata") or {}).get("name", "")
            handle = None if kind == "DELETED" else \
                pod_to_handle(pod, self.config, now_wall=now_wall, now_mono=now_mono)
            old = self._pods.get(name)
            if handle is None:
                self._pods.pop(name, None)
            else:
                self._pods[name] = self._keep_start(handle)
            changed = not _same(old, handle)
        if changed:
            self._notify()

    def _keep_start(self, handle: ReplicaHandle) -> ReplicaHandle:
        old = self._pods.get(handle.id)
        if old is not None:
            handle.started_at = old.started_at     # stable ages across events
        return handle

    def _on_deployments(self, kind: str, obj: dict | None, items: list[dict]) -> None:
        def replicas_of(d: dict) -> int:
            return int((d.get("spec") or {}).get("replicas", 1))

        if kind == "SYNC":
            self._spec_replicas = {d["metadata"]["name"]: replicas_of(d) for d in items}
            missing = sorted(set(expected_deployments(self.config)) - set(self._spec_replicas))
            if missing:
                log.warning("no Deployment %s in namespace %s: apply compose/k8s/ (scaling them fails)",
                            ", ".join(missing), self.namespace)
        elif kind == "DELETED":
            self._spec_replicas.pop(obj["metadata"]["name"], None)
        else:
            self._spec_replicas[obj["metadata"]["name"]] = replicas_of(obj)

    def _notify(self) -> None:
        for callback in list(self._callbacks):
            try:
                callback()
            except Exception:            # one bad subscriber must not stop the watch
                log.exception("replica change callback failed")

