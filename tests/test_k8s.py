"""k8s/ manifests: KubeRay CRD schemas, Ray's Serve schema, one source of truth."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from deployments.config.app_args import AppArgs, ServedApp, load_serve_config

ROOT = Path(__file__).resolve().parents[1]
CRDS = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}


def _kuberay_dir() -> Path:
    """KubeRay's CRDs: ``$KUBERAY_CRDS_DIR``, else ``../shared/kuberay`` beside this checkout, else beside the
    repository it was cloned from (a clean clone elsewhere, as CI makes, still validates against them)."""
    candidates = [Path(os.environ["KUBERAY_CRDS_DIR"])] if os.environ.get("KUBERAY_CRDS_DIR") else []
    candidates.append(ROOT.parent / "shared" / "kuberay")
    origin = subprocess.run(["git", "-C", str(ROOT), "config", "--get", "remote.origin.url"],
                            capture_output=True, text=True).stdout.strip()
    if origin and Path(origin).is_dir():  # a local clone: its origin is a path
        candidates.append(Path(origin).resolve().parent / "shared" / "kuberay")
    return next((c for c in candidates if (c / CRDS["RayService"]).exists()), candidates[0])


KUBERAY = _kuberay_dir()
KEYS_SECRET = "llm-serving-tenants"  # the --keys-secret the committed RayServices are rendered with


@functools.cache
def load_generator():
    spec = importlib.util.spec_from_file_location("k8s_generate", ROOT / "k8s" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def crd_schema(kind: str) -> dict:
    path = KUBERAY / CRDS[kind]
    if not path.exists():
        pytest.skip(f"{path} not present (../shared/kuberay; or set KUBERAY_CRDS_DIR)")
    crd = yaml.safe_load(path.read_text())
    [v1] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


@functools.cache
def _manifests() -> tuple:
    return tuple(_read_manifests())


def manifests() -> list[tuple[str, dict]]:
    return copy.deepcopy(list(_manifests()))


def _read_manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted((ROOT / "k8s").glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


@functools.cache
def validator(kind: str):
    schema = crd_schema(kind)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def validate(doc: dict) -> None:
    validator(doc["kind"]).validate(doc)


def rayservices() -> dict[str, dict]:
    return {name: doc for name, doc in manifests() if doc["kind"] == "RayService"}


def test_every_generated_rayservice_is_there():
    assert set(rayservices()) == set(load_generator().MANIFESTS)


@pytest.mark.parametrize("name, doc", manifests(), ids=lambda v: v if isinstance(v, str) else v.get("kind"))
def test_manifest_is_valid(name, doc):
    if doc["kind"] in CRDS:
        validate(doc)
    else:  # e.g. the PodMonitor, a ConfigMap: no CRD at hand; check it is a well-formed object
        assert {"apiVersion", "kind", "metadata"} <= doc.keys() and doc["metadata"].get("name"), name
        assert {"spec", "data", "stringData"} & doc.keys(), name


@pytest.mark.parametrize("breakage", ["min_replicas_text", "no_head_template", "unknown_field_type"])
@pytest.mark.parametrize("name", sorted(load_generator().MANIFESTS))
def test_a_broken_manifest_fails(name, breakage):
    broken = copy.deepcopy(rayservices()[name])
    cluster = broken["spec"]["rayClusterConfig"]
    if breakage == "min_replicas_text":
        cluster["workerGroupSpecs"][0]["minReplicas"] = "one"
    elif breakage == "no_head_template":
        del cluster["headGroupSpec"]["template"]
    else:
        cluster["enableInTreeAutoscaling"] = "yes please"
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


def test_generated_files_are_current():
    generator = load_generator()
    assert set(generator.MANIFESTS) < set(generator.GENERATED)
    for filename in generator.GENERATED:
        assert (ROOT / "k8s" / filename).read_text() == generator.render(filename, KEYS_SECRET), \
            f"k8s/{filename} is stale: run python k8s/generate.py --keys-secret {KEYS_SECRET}"


def embedded_serve_config(name: str) -> dict:
    return yaml.safe_load(rayservices()[name]["spec"]["serveConfigV2"])


@pytest.mark.parametrize("name", sorted(load_generator().MANIFESTS))
def test_serve_config_v2_passes_rays_schema_and_selects_gpus(name):
    from ray.serve.schema import ServeDeploySchema

    embedded = embedded_serve_config(name)
    ServeDeploySchema.model_validate(embedded)
    args = AppArgs.model_validate(embedded["applications"][0]["args"])
    assert {**({"profile": args.profile} if args.profile else {"layout": args.layout})} == \
        load_generator().MANIFESTS[name][1]
    assert all(pool.profile.llm_config["accelerator_config"]["kind"] == "gpu" for pool in args.pools)


def served(name: str) -> ServedApp:
    return ServedApp.from_config_app(embedded_serve_config(name)["applications"][0])


def cluster_only_settings(name: str) -> dict:
    """What serveConfigV2 sets beyond serve_config.yaml: {path: value}."""
    app = served(name)
    args = app.args
    served_profiles = {args.profile} if args.profile else {p.profile for p in args.layouts[args.layout].pools.values()}
    graceful = longest_stream_s(embedded_serve_config(name))
    where = ("applications", 0, "args")
    router = ("applications", 0, "deployments", 0)  # the Router entry, first in serve_config.yaml
    routers = app.router_deployment.get("autoscaling_config", {}).get("max_replicas", 1)
    settings = {("http_options", "host"): "0.0.0.0",
                (*router, "graceful_shutdown_timeout_s"): graceful,
                # at least two routers, at most half of them on one node
                (*router, "max_replicas_per_node"): -(-max(routers, 2) // 2),
                # the tenants file from the key Secret's mount (tests/test_k8s_tenancy.py)
                (*router, "user_config", "tenancy", "keys_file"): "/etc/llm-serving/tenancy/tenants.yaml"}
    if routers < 2:
        settings[(*router, "autoscaling_config")] = {
            **args.router_deployment.get("autoscaling_config", {}), "min_replicas": 2, "max_replicas": 2}
    for profile in served_profiles:
        settings[(*where, "profiles", profile, "llm_config", "deployment_config", "graceful_shutdown_timeout_s")] = \
            graceful
    return settings


def set_path(config: dict, path: tuple, value) -> None:
    *parents, leaf = path
    for key in parents:
        config = config[key] if isinstance(key, int) else config.setdefault(key, {})
    config[leaf] = value


@pytest.mark.parametrize("name", sorted(load_generator().MANIFESTS))
def test_serve_config_v2_is_serve_config_yaml_but_for_selection_and_cluster_settings(name):
    """Only what the selection serves: an edit of a profile or layout the cluster does not serve leaves
    serveConfigV2 as it is, so the operator restarts nothing for it."""
    local = load_serve_config()
    args = local["applications"][0]["args"]
    args.pop("profile", None)
    selection = load_generator().MANIFESTS[name][1]
    args = local["applications"][0]["args"] = {**selection, **args}
    app = served(name)
    served_profiles = {pool.profile for pool in (app.args.layouts[app.args.layout].pools.values()
                                                 if app.args.layout else [])} or {app.args.profile}
    args["profiles"] = {k: v for k, v in args["profiles"].items() if k in served_profiles}
    args["layouts"] = {k: v for k, v in args["layouts"].items() if k == selection.get("layout")}
    assert len(args["profiles"]) < len(load_serve_config()["applications"][0]["args"]["profiles"])
    for path, value in cluster_only_settings(name).items():
        set_path(local, path, value)
    assert embedded_serve_config(name) == local


def longest_stream_s(serve_config: dict) -> int:
    """Independently of generate.py: per served class, start deadline + slack x max_tokens cap x TPOT SLO
    + stall timeout (the router's budgets, deployments/router/budgets.py), the largest, rounded up."""
    app = ServedApp.from_config_app(serve_config["applications"][0])
    cap = app.router.admission.max_tokens_cap
    longest = 0.0
    for pool in app.args.pools:
        queues = app.queue_settings(pool.profile)
        for cls in pool.classes or list(queues.classes):
            t = queues.classes[cls]
            longest = max(longest, t.start_deadline_s + queues.generation_slack * cap * t.tpot_s + queues.stall_s)
    return int(-(-longest // 1))


@pytest.mark.parametrize("name", sorted(load_generator().MANIFESTS))
def test_shutdown_and_upgrade_settings_follow_the_longest_stream(name):
    service = rayservices()[name]
    spec, cluster = service["spec"], service["spec"]["rayClusterConfig"]
    stream = longest_stream_s(embedded_serve_config(name))
    assert stream > 60  # a 2,048-token answer at 50 ms/token alone is 102 s: Serve's 20 s default cuts it
    app = served(name)
    for pool in app.args.pools:  # every LLM deployment, as the app builds it, and the router
        assert pool.llm_config_fields()["deployment_config"]["graceful_shutdown_timeout_s"] == stream
    assert app.router_deployment["graceful_shutdown_timeout_s"] == stream
    # The pod outlives the drain, which outlives Serve's graceful shutdown.
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert group["template"]["spec"]["terminationGracePeriodSeconds"] > stream
    for group in cluster["workerGroupSpecs"]:
        grace = group["template"]["spec"]["terminationGracePeriodSeconds"]
        [container] = group["template"]["spec"]["containers"]
        pre_stop = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
        drain = int(pre_stop.split("--deadline-remaining-seconds ")[1].split()[0])
        assert stream < drain < grace and "ray drain-node" in pre_stop
    # An upgrade's old cluster is deleted only after its longest stream could have ended.
    assert spec["rayClusterDeletionDelaySeconds"] > stream
    upgrade = spec["upgradeStrategy"]
    assert upgrade["type"] == load_generator().MANIFESTS[name][2]
    if upgrade["type"] == "NewClusterWithIncrementalUpgrade":  # KubeRay's ValidateClusterUpgradeOptions
        options = upgrade["clusterUpgradeOptions"]
        assert cluster["enableInTreeAutoscaling"] and options["gatewayClassName"]
        assert 0 < options["stepSizePercent"] <= options["maxSurgePercent"] <= 100 and options["intervalSeconds"] > 0
    else:
        assert upgrade == {"type": "None"}


def ray_containers(cluster: dict) -> list[tuple[str, dict, dict]]:
    """(group name, pod spec, Ray container) of the head and every worker group."""
    groups = [("head", cluster["headGroupSpec"]), *((g["groupName"], g) for g in cluster["workerGroupSpecs"])]
    return [(name, g["template"]["spec"], g["template"]["spec"]["containers"][0]) for name, g in groups]


def gpu_groups(cluster: dict) -> list[dict]:
    return [g for g in cluster["workerGroupSpecs"] if g.get("resources")]


def check_worker_group(worker: dict, resources: dict, node_pool: str | None) -> None:
    container = worker["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    # KubeRay v1.7's group-level map (quantity strings), never rayStartParams.resources: KubeRay pastes that
    # into the shell unquoted, and refuses a group that sets both (validation.go, validateRayGroupResources).
    assert {k: float(v) for k, v in worker["resources"].items()} == resources
    assert not {"resources", "num-cpus", "num-gpus", "memory"} & set(worker.get("rayStartParams", {}))
    spec = worker["template"]["spec"]
    assert spec["tolerations"] and spec["nodeSelector"]["nvidia.com/gpu.product"]
    assert spec["nodeSelector"].get("llm-serving/node-pool") == node_pool
    assert {v["name"] for v in spec["volumes"]} >= {"model-cache", "dshm"}


def test_single_profile_cluster_has_one_gpu_worker_group():
    cluster = rayservices()["rayservice.yaml"]["spec"]["rayClusterConfig"]
    [worker] = gpu_groups(cluster)
    check_worker_group(worker, {"gpu_4090d": 4}, None)
    assert (worker["minReplicas"], worker["maxReplicas"]) == (1, 1)  # TP1 × at most 4 replicas: one node
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    assert cluster["enableInTreeAutoscaling"] is True


def test_mixed_layout_cluster_has_a_worker_group_per_node_pool():
    cluster = rayservices()["rayservice-mixed.yaml"]["spec"]["rayClusterConfig"]
    interactive, long_context = gpu_groups(cluster)
    check_worker_group(interactive, {"gpu_4090d": 4, "node_pool_4090d_interactive": 4}, "4090d-interactive")
    check_worker_group(long_context, {"gpu_4090d": 4, "node_pool_4090d_long_context": 4}, "4090d-long-context")
    # TP1: 2..8 replicas = 2..8 GPUs = 1..2 nodes; TP4: 1..2 replicas = 1..2 nodes.
    assert (interactive["minReplicas"], interactive["maxReplicas"]) == (1, 2)
    assert (long_context["minReplicas"], long_context["maxReplicas"]) == (1, 2)
    # Each pool's bundles ask for exactly the resource its own group advertises.
    args = AppArgs.model_validate(embedded_serve_config("rayservice-mixed.yaml")["applications"][0]["args"])
    for pool, group in zip(args.pools, (interactive, long_context)):
        advertised = group["resources"]
        for bundle in pool.llm_config_fields()["placement_group_config"]["bundles"]:
            assert {k for k in bundle if k not in ("GPU", "CPU")} <= set(advertised)


def docs_of(filename: str) -> list[dict]:
    return [doc for name, doc in manifests() if name == filename]


def env_of(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("name", sorted(load_generator().MANIFESTS))
def test_head_failures_survived(name):
    """GCS state in Redis, the head out of the Serve service and free of replicas, routers spread."""
    generator = load_generator()
    spec = rayservices()[name]["spec"]
    cluster = spec["rayClusterConfig"]
    assert spec["excludeHeadPodFromServeSvc"] is True
    ft = cluster["gcsFaultToleranceOptions"]
    [service, statefulset] = docs_of("redis.yaml")
    assert ft["redisAddress"] == f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    secret = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    redis_env = env_of(statefulset["spec"]["template"]["spec"]["containers"][0])
    assert redis_env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == secret  # one Secret, by name
    assert "value" not in ft["redisPassword"]
    assert service["spec"]["selector"] == statefulset["spec"]["template"]["metadata"]["labels"]
    # KubeRay refuses these beside gcsFaultToleranceOptions (validation.go, ValidateRayClusterSpec).
    head = cluster["headGroupSpec"]
    assert "redis-password" not in head["rayStartParams"]
    assert not {"REDIS_PASSWORD", "RAY_REDIS_ADDRESS"} & set(env_of(head["template"]["spec"]["containers"][0]))
    assert head["rayStartParams"]["num-cpus"] == "0"  # no replica, so no stream, on the head
    # Routers: at least two, at most half on one node, and enough non-head nodes to hold them all.
    router = served(name).router_deployment
    replicas = router["autoscaling_config"]["max_replicas"]
    assert replicas >= 2 and router["max_replicas_per_node"] <= -(-replicas // 2)
    [router_group] = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == generator.ROUTER_GROUP]
    min_nodes = sum(g["minReplicas"] for g in cluster["workerGroupSpecs"])
    assert router_group["minReplicas"] >= 2 and min_nodes * router["max_replicas_per_node"] >= replicas


@pytest.mark.parametrize("name", sorted(load_generator().MANIFESTS))
def test_ray_pods_read_the_shipped_model_cache_offline_without_a_token(name):
    generator = load_generator()
    [claim, job] = docs_of("model-cache.yaml")
    for group, spec, container in ray_containers(rayservices()[name]["spec"]["rayClusterConfig"]):
        env = env_of(container)
        assert "HF_TOKEN" not in env and env["HF_HUB_OFFLINE"]["value"] == "1", group
        [volume] = [v for v in spec["volumes"] if v["name"] == "model-cache"]
        assert volume["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"], "readOnly": True}
        [mount] = [m for m in container["volumeMounts"] if m["name"] == "model-cache"]
        assert mount["readOnly"] is True and env["HF_HOME"]["value"].startswith(mount["mountPath"])
        assert "RAY_AUTH_MODE" not in env, group  # KubeRay sets token mode only where the env lacks it
    # The Job: the only holder of the token, the only writer, every served model.
    job_spec = job["spec"]["template"]["spec"]
    [download] = job_spec["containers"]
    assert env_of(download)["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == generator.HF_SECRET["name"]
    assert env_of(download)["HF_HOME"]["value"] == generator.HF_HOME
    assert job_spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    args = AppArgs.model_validate(embedded_serve_config(name)["applications"][0]["args"])
    for pool in args.pools:
        loading = pool.profile.llm_config["model_loading_config"]
        assert repr(loading.get("model_source") or loading["model_id"]) in " ".join(download["command"])


def test_hf_token_appears_only_in_the_download_job():
    holders = [(name, doc["kind"]) for name, doc in manifests() if "HF_TOKEN" in json.dumps(doc)]
    assert holders == [("model-cache.yaml", "Job")]


@pytest.mark.parametrize("name", sorted(load_generator().MANIFESTS))
def test_object_store_leaves_shm_for_nccl_and_dashboard_needs_a_token(name):
    from ray.autoscaler._private.kuberay.utils import parse_quantity

    cluster = rayservices()[name]["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": load_generator().RAY_AUTH_SECRET}
    assert "object-store-memory" in cluster["headGroupSpec"]["rayStartParams"]
    for group in gpu_groups(cluster):
        [shm] = [v for v in group["template"]["spec"]["volumes"] if v["name"] == "dshm"]
        store = int(group["rayStartParams"]["object-store-memory"])
        assert parse_quantity(shm["emptyDir"]["sizeLimit"]) - store >= 8 * 1024**3  # NCCL's room


def test_images_are_pinned_in_one_place():
    generator = load_generator()
    image = generator.IMAGE
    tag = image.rsplit(":", 1)[-1]
    assert "@sha256:" in image or (tag not in ("latest", "") and any(c.isdigit() for c in tag) and "/" not in tag)
    images = set()
    for _, doc in manifests():
        text = json.dumps(doc)
        images |= {part.split('"')[0] for part in text.split('"image": "')[1:]}
    assert images == {generator.IMAGE, generator.REDIS_IMAGE}
    assert not generator.REDIS_IMAGE.endswith(":latest") and ":" in generator.REDIS_IMAGE
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "docs/bench"} <= set(dockerignore) and "**/__pycache__" in dockerignore


def test_network_policies_cover_the_ray_pods_and_redis():
    ray_policy, redis_policy = docs_of("networkpolicy.yaml")
    selector = ray_policy["spec"]["podSelector"]["matchLabels"]
    for name, service in rayservices().items():
        for group, spec, container in ray_containers(service["spec"]["rayClusterConfig"]):
            group_spec = service["spec"]["rayClusterConfig"]
            labels = {"ray.io/is-ray-node": "yes"}  # KubeRay's own, plus the template's
            template = (group_spec["headGroupSpec"] if group == "head" else
                        next(g for g in group_spec["workerGroupSpecs"] if g["groupName"] == group))["template"]
            labels |= template["metadata"]["labels"]
            assert selector.items() <= labels.items(), (name, group)
    allowed = {p["port"] for rule in ray_policy["spec"]["ingress"] for p in rule.get("ports", [])}
    assert {8000, 8265, 8080, 44217, 44227} <= allowed
    [open_rule] = [r for r in ray_policy["spec"]["ingress"] if "from" not in r]
    assert [p["port"] for p in open_rule["ports"]] == [8000]  # only the API is open to all
    [service, statefulset] = docs_of("redis.yaml")
    assert redis_policy["spec"]["podSelector"]["matchLabels"] == statefulset["spec"]["template"]["metadata"]["labels"]


def test_podmonitors_are_selected_by_kube_prometheus_stack_and_scrape_ports_pods_expose():
    monitors = {doc["spec"]["selector"]["matchLabels"]["ray.io/node-type"]: doc
                for _, doc in manifests() if doc["kind"] == "PodMonitor"}
    assert set(monitors) == {"head", "worker"}
    for monitor in monitors.values():  # kube-prometheus-stack selects release=<its Helm release>
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    head_ports = {e["port"] for e in monitors["head"]["spec"]["podMetricsEndpoints"]}
    assert head_ports == {"metrics", "as-metrics", "dash-metrics"}  # Ray's 8080, autoscaler 44217, dashboard 44227
    for name, service in rayservices().items():
        for group, spec, container in ray_containers(service["spec"]["rayClusterConfig"]):
            wanted = monitors["head" if group == "head" else "worker"]
            ports = {e["port"] for e in wanted["spec"]["podMetricsEndpoints"]}
            assert ports <= {p["name"] for p in container["ports"]}, (name, group)
