"""k8s/ manifests: KubeRay CRD schemas, Ray's Serve schema, one source of truth."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import jsonschema
import pytest
import yaml

from deployments.config.app_args import AppArgs, load_serve_config

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT.parent / "shared" / "kuberay"
CRDS = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}


def load_generator():
    spec = importlib.util.spec_from_file_location("k8s_generate", ROOT / "k8s" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def crd_schema(kind: str) -> dict:
    path = KUBERAY / CRDS[kind]
    if not path.exists():
        pytest.skip(f"{path} not present (../shared/kuberay)")
    crd = yaml.safe_load(path.read_text())
    [v1] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


def manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted((ROOT / "k8s").glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def validate(doc: dict) -> None:
    jsonschema.validate(doc, crd_schema(doc["kind"]))


def test_there_is_a_rayservice():
    assert [d["kind"] for _, d in manifests()].count("RayService") == 1


@pytest.mark.parametrize("name, doc", manifests(), ids=lambda v: v if isinstance(v, str) else v.get("kind"))
def test_manifest_is_valid(name, doc):
    if doc["kind"] in CRDS:
        validate(doc)
    else:  # e.g. the PodMonitor: no CRD at hand; check it is a well-formed object
        assert {"apiVersion", "kind", "metadata", "spec"} <= doc.keys(), name


@pytest.mark.parametrize("breakage", ["min_replicas_text", "no_head_template", "unknown_field_type"])
def test_a_broken_manifest_fails(breakage):
    [doc] = [d for _, d in manifests() if d["kind"] == "RayService"]
    broken = copy.deepcopy(doc)
    cluster = broken["spec"]["rayClusterConfig"]
    if breakage == "min_replicas_text":
        cluster["workerGroupSpecs"][0]["minReplicas"] = "one"
    elif breakage == "no_head_template":
        del cluster["headGroupSpec"]["template"]
    else:
        cluster["enableInTreeAutoscaling"] = "yes please"
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


def rayservice() -> dict:
    [doc] = [d for _, d in manifests() if d["kind"] == "RayService"]
    return doc


def test_generated_file_is_current():
    assert (ROOT / "k8s" / "rayservice.yaml").read_text() == load_generator().render(), \
        "k8s/rayservice.yaml is stale: run python k8s/generate.py"


def test_serve_config_v2_passes_rays_schema_and_is_the_gpu_profile():
    from ray.serve.schema import ServeDeploySchema

    embedded = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    args = AppArgs.model_validate(embedded["applications"][0]["args"])
    assert args.profile == load_generator().GPU_PROFILE
    assert args.selected.llm_config["accelerator_config"]["kind"] == "gpu"


def test_serve_config_v2_is_serve_config_yaml_but_for_profile_and_host():
    embedded = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    local = load_serve_config()
    local["http_options"]["host"] = "0.0.0.0"
    local["applications"][0]["args"]["profile"] = load_generator().GPU_PROFILE
    assert embedded == local


def test_worker_group_advertises_the_gpu_group_resource():
    worker = rayservice()["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    container = worker["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert '"gpu_4090d": 4' in worker["rayStartParams"]["resources"]
    assert worker["template"]["spec"]["tolerations"] and worker["template"]["spec"]["nodeSelector"]
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]
    head = rayservice()["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert rayservice()["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
