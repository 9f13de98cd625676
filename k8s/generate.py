"""Generate the RayService manifests in k8s/ from serve_config.yaml: one source of truth.

    python k8s/generate.py --keys-secret llm-serving-tenants          # write every manifest
    python k8s/generate.py --keys-secret llm-serving-tenants --check  # exit 1 if a committed one is stale

--keys-secret names the Kubernetes Secret whose key `tenants.yaml` is the tenants file (tiers, tenants,
SHA-256 digests of their API keys; k8s/tenants-secret.example.yaml). It is required: without keys the
service would be open to anyone who reaches it. The committed manifests name `llm-serving-tenants`.

Each RayService's serveConfigV2 is serve_config.yaml with one GPU profile or
layout selected, the proxy listening on all interfaces and the router's
tenants file read from the key Secret's mount; nothing else differs. Its worker
groups follow from the selected pools: one group per node pool, advertising the
`gpu_4090d` resource and the pool's `node_pool_<name>` resource that the pool's
bundles ask for, sized from the pools' replica bounds. Images, volumes and node labels live in the constants below.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from deployments.config.app_args import AppArgs, ServedApp, router_entry  # noqa: E402
from deployments.config.layouts import node_pool_resource  # noqa: E402
from deployments.router.budgets import decide_budgets  # noqa: E402

SERVE_CONFIG = ROOT / "serve_config.yaml"
K8S = Path(__file__).parent

GPU_PROFILE = "qwen2.5-7b-4090d-tp1-fp16"
# manifest file: (metadata.name, what serveConfigV2 selects, upgrade strategy)
#   "None": the operator never starts a second cluster by itself; docs/k8s.md has the upgrade steps. For
#     the single-node profile: a second cluster would need a second 4-GPU node that the pool does not have.
#   "NewClusterWithIncrementalUpgrade": a new cluster grows step by step beside the old one while the
#     Gateway API shifts traffic to it, and the old one shrinks with Serve's graceful shutdown. Needs the
#     Gateway API CRDs and a controller for GATEWAY_CLASS; without them, use "None".
MANIFESTS = {
    "rayservice.yaml": ("llm-serving", {"profile": GPU_PROFILE}, "None"),
    "rayservice-mixed.yaml": ("llm-serving-mixed", {"layout": "4090d-mixed"}, "NewClusterWithIncrementalUpgrade"),
}
GATEWAY_CLASS = "istio"  # a GatewayClass installed in the cluster (KubeRay's sample uses istio)
UPGRADE_STEP_PERCENT = 25  # share of capacity moved per step; also the surge over the old cluster
UPGRADE_INTERVAL_S = 60
# Seconds past the longest stream for a node to drain: Serve starts replacement replicas elsewhere,
# then stops the draining ones gracefully; a pod also needs time for its processes to exit.
SHUTDOWN_MARGIN_S = 60
RAY_VERSION = "2.60.0"
# The one place the image is named. k8s/Dockerfile: ray-llm 2.60 + this repo. Push each build under a new
# tag and never overwrite it (turn on tag immutability in the registry), or pin the digest:
# "ghcr.io/example/llm-serving@sha256:<digest of the pushed build>".
IMAGE = "ghcr.io/example/llm-serving:0.1.0-ray2.60.0-vllm0.29.0"
REDIS_IMAGE = "redis:7.4.2"
APP_LABELS = {"app.kubernetes.io/name": "llm-serving"}
GPUS_PER_NODE = 4
GPU_RESOURCE = "gpu_4090d"
NODE_SELECTOR = {"nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-4090-D"}
NODE_POOL_LABEL = "llm-serving/node-pool"  # the label a pool's nodes carry
DEFAULT_GROUP = "gpu-4090d"  # worker group for pools without a node_pool
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
MODEL_CACHE_CLAIM = "llm-model-cache"  # ReadWriteMany PVC holding Hugging Face downloads
MODEL_CACHE_SIZE = "100Gi"
HF_HOME = "/models/hf"
# Secrets referenced by name, never shipped with a value (docs/k8s.md: how to create them).
HF_SECRET = {"name": "huggingface", "key": "token"}  # only the model-cache fill Job reads it
REDIS_SECRET = {"name": "llm-serving-redis", "key": "password"}
RAY_AUTH_SECRET = "llm-serving-ray-auth"  # key auth_token: KubeRay's authOptions.secretName
# The tenants file (API key digests, tiers): the Secret named by --keys-secret, mounted as a whole volume on
# every Ray pod (router replicas may land on any). Never subPath: the kubelet updates a Secret volume in
# place (it swaps the `..data` symlink) but never a subPath mount; the router re-reads the file on change.
TENANTS_KEY = "tenants.yaml"
TENANCY_VOLUME = "tenancy"
TENANCY_MOUNT = "/etc/llm-serving/tenancy"
TENANTS_FILE = f"{TENANCY_MOUNT}/{TENANTS_KEY}"
COMMITTED_KEYS_SECRET = "llm-serving-tenants"  # what the committed manifests name; k8s/tenants-secret.example.yaml
REDIS_NAME = "llm-serving-redis"
REDIS_PORT = 6379
# Ray's object store lives in /dev/shm; NCCL (TP > 1 with NCCL_P2P_DISABLE=1) moves its traffic there too.
SHM_SIZE = "16Gi"
WORKER_OBJECT_STORE_BYTES = 4 * 1024**3  # leaves 12Gi of /dev/shm to NCCL
HEAD_OBJECT_STORE_BYTES = 2 * 1024**3
# The router runs at least this many replicas, at most half of them on one node: losing a node (not the
# head) leaves the rest serving. ROUTER_GROUP_NODES small CPU pods give the spread room on every layout.
MIN_ROUTER_REPLICAS = 2
ROUTER_GROUP = "cpu-router"
ROUTER_GROUP_NODES = 2
OPERATOR_NAMESPACE = "kuberay-operator"  # where the KubeRay operator runs: it calls the dashboard
MONITORING_NAMESPACE = "monitoring"  # where kube-prometheus-stack's Prometheus runs
PROMETHEUS_RELEASE = "kube-prometheus-stack"  # its Helm release: it selects monitors labelled release=<this>
DASHBOARD_PORT, SERVE_PORT, METRICS_PORT = 8265, 8000, 8080
AUTOSCALER_METRICS_PORT, DASHBOARD_METRICS_PORT = 44217, 44227

HEADER = "# GENERATED by k8s/generate.py from serve_config.yaml; edit those, then regenerate.\n"


def longest_stream_s(app: ServedApp) -> int:
    """The longest a request may hold a stream, seconds: over every served pool and the classes it takes,
    its start deadline (queue wait + first token) plus its generation budget at the admission cap, as
    the router computes them (deployments/router/budgets.py). Every shutdown figure derives from it."""
    cap = app.router.admission.max_tokens_cap
    longest = 0.0
    for pool in app.args.pools:
        queues = app.queue_settings(pool.profile)
        for name in pool.classes or list(queues.classes):
            budgets = decide_budgets(queues.classes[name], queues, cap, 0.0, None)
            longest = max(longest, budgets.start_deadline_s + budgets.generation_s)
    return math.ceil(longest)


def shutdown_timings(app: ServedApp) -> dict:
    """Serve's graceful shutdown waits out the longest stream; a node drains within the pod's grace
    period; the old cluster of an upgrade outlives its last stream. One figure, consistent."""
    stream = longest_stream_s(app)
    return {
        "graceful_shutdown_timeout_s": stream,
        "drain_deadline_s": stream + SHUTDOWN_MARGIN_S // 2,
        "termination_grace_period_s": stream + SHUTDOWN_MARGIN_S,
        "cluster_deletion_delay_s": stream + SHUTDOWN_MARGIN_S,
    }


def serve_config_for_cluster(selection: dict) -> dict:
    """serve_config.yaml with the selection and only what it serves (its profiles, its layout: an edit of
    a profile the cluster does not serve must not restart its engines), the proxy on all interfaces, and
    the cluster-only settings: Serve's graceful shutdown on the LLM and router deployments set from the
    longest stream, the router spread over nodes, and its tenants file at the Secret's mount."""
    config = copy.deepcopy(yaml.safe_load(SERVE_CONFIG.read_text()))
    config["http_options"]["host"] = "0.0.0.0"  # the Serve service must reach the proxy
    for app in config["applications"]:
        args = {k: v for k, v in app["args"].items() if k not in ("profile", "layout")}
        app["args"] = {**selection, **args}
        served = served_profiles(AppArgs.model_validate(app["args"]))  # a missing profile or layout stops here
        app["args"]["profiles"] = {name: args["profiles"][name] for name in sorted(served)}
        app["args"]["layouts"] = {name: args["layouts"][name] for name in selection.values()
                                  if "layout" in selection}
        served_app = ServedApp.from_config_app(app)
        graceful = {"graceful_shutdown_timeout_s": shutdown_timings(served_app)["graceful_shutdown_timeout_s"]}
        for name in served:
            llm_config = app["args"]["profiles"][name]["llm_config"]
            llm_config["deployment_config"] = {**llm_config.get("deployment_config", {}), **graceful}
        router = router_entry(app)
        router.update(graceful, **router_spread(served_app))
        router["user_config"]["tenancy"] = {**(router["user_config"].get("tenancy") or {}), "keys_file": TENANTS_FILE}
        ServedApp.from_config_app(app)
    return config


def router_spread(app: ServedApp) -> dict:
    """The router's replicas (the profiles' router_replicas, at least MIN_ROUTER_REPLICAS), at most half
    of them on one node."""
    options = app.router_deployment
    replicas = options.get("num_replicas") or options.get("autoscaling_config", {}).get("max_replicas", 1)
    spread = {}
    if replicas < MIN_ROUTER_REPLICAS:
        replicas = MIN_ROUTER_REPLICAS
        spread["autoscaling_config"] = {**options.get("autoscaling_config", {}), "min_replicas": replicas,
                                        "max_replicas": replicas}
    spread["max_replicas_per_node"] = math.ceil(replicas / 2)
    return spread


def served_profiles(app_args: AppArgs) -> set[str]:
    """Names of the profiles the selection serves (one, or each pool's of the layout)."""
    if app_args.profile is not None:
        return {app_args.profile}
    return {pool.profile for pool in app_args.layouts[app_args.layout].pools.values()}


def _env() -> list[dict]:
    """Ray containers read models from the read-only cache, offline: no Hugging Face token, no download
    (the model-cache Job filled it). Token auth: KubeRay injects RAY_AUTH_MODE/RAY_AUTH_TOKEN."""
    return [{"name": "HF_HOME", "value": HF_HOME}, {"name": "HF_HUB_OFFLINE", "value": "1"}]


def _container(name: str, resources: dict, shm: bool, ports: list[dict] = ()) -> dict:
    mounts = [{"name": "model-cache", "mountPath": "/models", "readOnly": True},
              {"name": TENANCY_VOLUME, "mountPath": TENANCY_MOUNT, "readOnly": True}]
    if shm:
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return {
        "name": name,
        "image": IMAGE,
        "resources": resources,
        "env": _env(),
        "ports": [{"containerPort": METRICS_PORT, "name": "metrics"}, *ports],
        "volumeMounts": mounts,
    }


def _volumes(shm: bool, keys_secret: str) -> list[dict]:
    volumes = [{"name": "model-cache", "persistentVolumeClaim": {"claimName": MODEL_CACHE_CLAIM, "readOnly": True}},
               # Not optional: without the Secret (or its key) the pod waits in ContainerCreating, never open.
               {"name": TENANCY_VOLUME, "secret": {"secretName": keys_secret, "optional": False,
                                                   "items": [{"key": TENANTS_KEY, "path": TENANTS_KEY}]}}]
    if shm:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}})
    return volumes


def _drain_on_stop(timings: dict) -> dict:
    """preStop of a worker's Ray container: tell the GCS this node goes away by a deadline, so Serve
    starts replacement replicas elsewhere and stops this node's replicas gracefully (their streams
    finish), then wait until no Serve replica is left here or the deadline passes. Without it SIGTERM
    kills raylet and every stream on the node at once."""
    deadline = timings["drain_deadline_s"]
    return {"preStop": {"exec": {"command": ["/bin/bash", "-c", (
        "ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --reason-message 'pod terminating' "
        f"--deadline-remaining-seconds {deadline} || true; "
        f"while pgrep -f 'ServeReplica:' >/dev/null && [ $SECONDS -lt {deadline} ]; do sleep 5; done")]}}}


def _worker_group(name: str, node_pool: str | None, gpus_min: int, gpus_max: int, timings: dict,
                  keys_secret: str) -> dict:
    resources = {GPU_RESOURCE: GPUS_PER_NODE}
    node_selector = dict(NODE_SELECTOR)
    if node_pool:
        resources[node_pool_resource(node_pool)] = GPUS_PER_NODE
        node_selector[NODE_POOL_LABEL] = node_pool
    min_nodes = math.ceil(gpus_min / GPUS_PER_NODE)
    return {
        "groupName": name,
        "replicas": min_nodes,
        "minReplicas": min_nodes,
        "maxReplicas": max(1, math.ceil(gpus_max / GPUS_PER_NODE)),
        # Pins GPU groups by custom resources: Ray names a 4090D's accelerator "G". KubeRay v1.7's group-level
        # map (quantity strings): the operator renders it as --resources='{...}' (pod.go,
        # updateRayStartParamsResources) and the autoscaler reads it as is; rayStartParams.resources would be
        # pasted unquoted into the shell command line, and the two forms may not be combined.
        "resources": {key: str(value) for key, value in resources.items()},
        "rayStartParams": {"object-store-memory": str(WORKER_OBJECT_STORE_BYTES)},
        "template": {"metadata": {"labels": dict(APP_LABELS)}, "spec": {
            "terminationGracePeriodSeconds": timings["termination_grace_period_s"],
            "nodeSelector": node_selector,
            "tolerations": GPU_TOLERATIONS,
            "containers": [{**_container("ray-worker", {
                "requests": {"cpu": "14", "memory": "96Gi", "nvidia.com/gpu": str(GPUS_PER_NODE)},
                "limits": {"cpu": "14", "memory": "96Gi", "nvidia.com/gpu": str(GPUS_PER_NODE)},
            }, shm=True), "lifecycle": _drain_on_stop(timings)}],
            "volumes": _volumes(shm=True, keys_secret=keys_secret),
        }},
    }


def _router_group(timings: dict, keys_secret: str) -> dict:
    """Small CPU nodes for the router replicas (and Serve proxies): with the head out of the Serve
    service and at most half the routers per node, traffic keeps flowing when any one node goes."""
    return {
        "groupName": ROUTER_GROUP,
        "replicas": ROUTER_GROUP_NODES,
        "minReplicas": ROUTER_GROUP_NODES,
        "maxReplicas": ROUTER_GROUP_NODES,
        "rayStartParams": {"object-store-memory": str(HEAD_OBJECT_STORE_BYTES)},
        "template": {"metadata": {"labels": dict(APP_LABELS)}, "spec": {
            "terminationGracePeriodSeconds": timings["termination_grace_period_s"],
            "containers": [{**_container("ray-worker", {
                "requests": {"cpu": "4", "memory": "8Gi"}, "limits": {"cpu": "4", "memory": "8Gi"},
            }, shm=False), "lifecycle": _drain_on_stop(timings)}],
            "volumes": _volumes(shm=False, keys_secret=keys_secret),
            "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                "weight": 100, "podAffinityTerm": {
                    "topologyKey": "kubernetes.io/hostname",
                    "labelSelector": {"matchLabels": {"ray.io/group": ROUTER_GROUP}}}}]}},
        }},
    }


def worker_groups(app_args: AppArgs, timings: dict, keys_secret: str) -> list[dict]:
    """One worker group per node pool, sized for its pools' replica bounds."""
    gpus: dict[str | None, list[int]] = {}
    for pool in app_args.pools:
        fields = pool.llm_config_fields()
        per_replica = len(fields["placement_group_config"]["bundles"])
        bounds = fields.get("deployment_config", {}).get("autoscaling_config", {})
        low, high = gpus.setdefault(pool.pool.node_pool, [0, 0])
        gpus[pool.pool.node_pool] = [low + per_replica * bounds.get("min_replicas", 1),
                                     high + per_replica * bounds.get("max_replicas", 1)]
    return [*(_worker_group(f"gpu-{node_pool}" if node_pool else DEFAULT_GROUP, node_pool, low, high, timings,
                            keys_secret)
              for node_pool, (low, high) in gpus.items()), _router_group(timings, keys_secret)]


def upgrade_strategy(kind: str) -> dict:
    if kind == "NewClusterWithIncrementalUpgrade":
        return {"type": kind, "clusterUpgradeOptions": {
            "gatewayClassName": GATEWAY_CLASS, "stepSizePercent": UPGRADE_STEP_PERCENT,
            "intervalSeconds": UPGRADE_INTERVAL_S, "maxSurgePercent": UPGRADE_STEP_PERCENT}}
    assert kind == "None", kind
    return {"type": "None"}


class MissingKeysSecret(ValueError):
    """Rendering a RayService without a key Secret named: refused, it would serve anyone."""


NO_KEYS_SECRET = (
    "refusing to render the RayServices without API keys: pass --keys-secret NAME, the Kubernetes Secret "
    f"whose key {TENANTS_KEY} holds the tenants file (tiers, tenants, SHA-256 digests of their keys; see "
    "k8s/tenants-secret.example.yaml and docs/k8s.md). Without keys the service would be open to anyone who "
    f"reaches it. The committed manifests use --keys-secret {COMMITTED_KEYS_SECRET}.")
# A Secret's name: a DNS-1123 subdomain.
_SECRET_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def check_keys_secret(keys_secret: str | None) -> str:
    if not keys_secret:
        raise MissingKeysSecret(NO_KEYS_SECRET)
    if len(keys_secret) > 253 or not _SECRET_NAME.fullmatch(keys_secret):
        raise MissingKeysSecret(f"--keys-secret {keys_secret!r} is not a Kubernetes Secret name "
                                "(lower-case letters, digits, '-' and '.', at most 253 characters)")
    return keys_secret


def rayservice(name: str, selection: dict, upgrade: str, keys_secret: str | None) -> dict:
    keys_secret = check_keys_secret(keys_secret)
    serve_config = serve_config_for_cluster(selection)
    app = ServedApp.from_config_app(serve_config["applications"][0])
    timings = shutdown_timings(app)
    head = {
        # No CPUs for Ray: no replica lands on the head, so a head restart stops no stream.
        "rayStartParams": {"num-gpus": "0", "num-cpus": "0", "dashboard-host": "0.0.0.0",
                           "object-store-memory": str(HEAD_OBJECT_STORE_BYTES)},
        "template": {"metadata": {"labels": dict(APP_LABELS)}, "spec": {
            "terminationGracePeriodSeconds": timings["termination_grace_period_s"],
            "containers": [_container(
                "ray-head", {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"cpu": "4", "memory": "16Gi"}},
                shm=False, ports=[{"containerPort": AUTOSCALER_METRICS_PORT, "name": "as-metrics"},
                                  {"containerPort": DASHBOARD_METRICS_PORT, "name": "dash-metrics"}])],
            "volumes": _volumes(shm=False, keys_secret=keys_secret)}},
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "labels": dict(APP_LABELS)},
        "spec": {
            "upgradeStrategy": upgrade_strategy(upgrade),
            # Traffic enters through the workers' proxies only: a head restart does not cut the Serve service.
            "excludeHeadPodFromServeSvc": True,
            # An upgrade's old cluster keeps serving the streams it holds after traffic moves away.
            "rayClusterDeletionDelaySeconds": timings["cluster_deletion_delay_s"],
            "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                # Dashboard and GCS take only requests with the token of this Secret (Ray >= 2.52).
                "authOptions": {"mode": "token", "secretName": RAY_AUTH_SECRET},
                # GCS state (actors, placement groups, Serve's controller checkpoint) in Redis: a new head
                # picks it up, and workers wait for it (RAY_GCS_RPC_SERVER_RECONNECT_TIMEOUT_S, 600 s).
                "gcsFaultToleranceOptions": {
                    "redisAddress": f"{REDIS_NAME}:{REDIS_PORT}",
                    "redisPassword": {"valueFrom": {"secretKeyRef": dict(REDIS_SECRET)}}},
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 300},
                "headGroupSpec": head,
                "workerGroupSpecs": worker_groups(app.args, timings, keys_secret),
            },
        },
    }


def model_sources() -> list[str]:
    """Every Hugging Face repository the generated RayServices serve."""
    sources = set()
    for _, selection, _ in MANIFESTS.values():
        app_args = AppArgs.model_validate(serve_config_for_cluster(selection)["applications"][0]["args"])
        for pool in app_args.pools:
            loading = pool.profile.llm_config["model_loading_config"]
            sources.add(loading.get("model_source") or loading["model_id"])
    return sorted(sources)


def model_cache() -> list[dict]:
    """The claim the Ray pods mount read-only, and the one Job that fills it: a single writer, so
    engines never download into the shared volume at once, and the only pod with the Hugging Face token."""
    claim = {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": MODEL_CACHE_CLAIM, "labels": dict(APP_LABELS)},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": MODEL_CACHE_SIZE}}},
    }
    download = "; ".join(["from huggingface_hub import snapshot_download",
                          *(f"print(snapshot_download({source!r}))" for source in model_sources())])
    job = {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": f"{MODEL_CACHE_CLAIM}-fill", "labels": dict(APP_LABELS)},
        "spec": {"backoffLimit": 3, "template": {"metadata": {"labels": dict(APP_LABELS)}, "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "download",
                "image": IMAGE,
                "command": ["python", "-c", download],
                "env": [{"name": "HF_HOME", "value": HF_HOME},
                        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {**HF_SECRET, "optional": True}}}],
                "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
                "volumeMounts": [{"name": "model-cache", "mountPath": "/models"}],
            }],
            "volumes": [{"name": "model-cache", "persistentVolumeClaim": {"claimName": MODEL_CACHE_CLAIM}}],
        }}},
    }
    return [claim, job]


def redis() -> list[dict]:
    """The GCS fault-tolerance store: one Redis with append-only persistence, password from a Secret."""
    labels = {"app.kubernetes.io/name": REDIS_NAME}
    password = {"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": dict(REDIS_SECRET)}}
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": REDIS_NAME, "labels": labels},
        "spec": {"selector": labels, "ports": [{"name": "redis", "port": REDIS_PORT, "targetPort": REDIS_PORT}]},
    }
    statefulset = {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": REDIS_NAME, "labels": labels},
        "spec": {
            "serviceName": REDIS_NAME, "replicas": 1, "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [{
                "name": "redis",
                "image": REDIS_IMAGE,
                "command": ["redis-server"],
                # $(VAR) is expanded by the kubelet from env; the password never sits in the manifest.
                "args": ["--requirepass", "$(REDIS_PASSWORD)", "--appendonly", "yes", "--dir", "/data"],
                "env": [password],
                "ports": [{"containerPort": REDIS_PORT, "name": "redis"}],
                "readinessProbe": {"exec": {"command": [
                    "sh", "-c", 'REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli ping | grep -q PONG']},
                    "periodSeconds": 5},
                "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            }]}},
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {
                "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "8Gi"}}}}],
        },
    }
    return [service, statefulset]


def network_policies() -> list[dict]:
    """Ray pods: anything from each other; the dashboard from the KubeRay operator; metrics from
    Prometheus; the Serve port from clients. Redis: only from this app's Ray pods (head, cleanup job)."""
    ray_pods = {"matchLabels": {**APP_LABELS, "ray.io/is-ray-node": "yes"}}

    def namespace(name):
        return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}

    def tcp(*ports):
        return [{"protocol": "TCP", "port": port} for port in ports]

    ray = {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "llm-serving-ray", "labels": dict(APP_LABELS)},
        "spec": {"podSelector": ray_pods, "policyTypes": ["Ingress"], "ingress": [
            {"from": [{"podSelector": ray_pods}]},
            {"from": [namespace(OPERATOR_NAMESPACE)], "ports": tcp(DASHBOARD_PORT, SERVE_PORT)},
            {"from": [namespace(MONITORING_NAMESPACE)],
             "ports": tcp(METRICS_PORT, AUTOSCALER_METRICS_PORT, DASHBOARD_METRICS_PORT)},
            {"ports": tcp(SERVE_PORT)},  # the API, through the Serve service (head excluded)
        ]},
    }
    redis_policy = {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": REDIS_NAME, "labels": dict(APP_LABELS)},
        "spec": {"podSelector": {"matchLabels": {"app.kubernetes.io/name": REDIS_NAME}},
                 "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchExpressions": [
                     {"key": "ray.io/cluster", "operator": "Exists"}]}}], "ports": tcp(REDIS_PORT)}]},
    }
    return [ray, redis_policy]


def pod_monitors() -> list[dict]:
    """Prometheus Operator: Ray's metrics from every pod, the autoscaler's and dashboard's from the head.
    Labelled release=PROMETHEUS_RELEASE, what kube-prometheus-stack selects by default."""
    relabel = [{"sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"], "targetLabel": "ray_io_cluster"}]

    def monitor(name, node_type, ports):
        return {
            "apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
            "metadata": {"name": name, "labels": {**APP_LABELS, "release": PROMETHEUS_RELEASE}},
            "spec": {"selector": {"matchLabels": {**APP_LABELS, "ray.io/node-type": node_type}},
                     "podMetricsEndpoints": [{"port": port, "path": "/metrics", "interval": "15s",
                                              "relabelings": relabel} for port in ports]},
        }
    return [monitor("llm-serving-ray-workers", "worker", ["metrics"]),
            monitor("llm-serving-ray-head", "head", ["metrics", "as-metrics", "dash-metrics"])]


# file: what it holds (besides MANIFESTS' RayServices)
OTHER_FILES = {
    "model-cache.yaml": model_cache,
    "redis.yaml": redis,
    "networkpolicy.yaml": network_policies,
    "podmonitor.yaml": pod_monitors,
}
GENERATED = [*MANIFESTS, *OTHER_FILES]


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2) as readable literal blocks."""


_BlockDumper.add_representer(
    str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))


def render(filename: str, keys_secret: str | None = None) -> str:
    """One file's text; a RayService needs keys_secret (MissingKeysSecret without it)."""
    if filename in OTHER_FILES:
        return HEADER + yaml.dump_all(OTHER_FILES[filename](), Dumper=_BlockDumper, sort_keys=False, width=120)
    name, selection, upgrade = MANIFESTS[filename]
    service = rayservice(name, selection, upgrade, keys_secret)
    return HEADER + yaml.dump(service, Dumper=_BlockDumper, sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--keys-secret", metavar="NAME",
                        help=f"the Secret holding the tenants file under the key {TENANTS_KEY} (required)")
    args = parser.parse_args(argv)
    try:  # every file rendered before any is written: a refusal leaves k8s/ as it was
        texts = {filename: render(filename, args.keys_secret) for filename in GENERATED}
    except MissingKeysSecret as exc:
        print(f"k8s/generate.py: {exc}", file=sys.stderr)
        return 2
    stale = []
    for filename, text in texts.items():
        path = K8S / filename
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(filename)
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)}; run python k8s/generate.py --keys-secret {args.keys_secret}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
