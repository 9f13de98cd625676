"""k8s/: the API keys' wiring (issue 16). The generated RayServices mount the key Secret on every Ray pod and
point the router's tenants file into that mount; rendering them without a key Secret named is refused."""

from __future__ import annotations

import hashlib
import json
import posixpath
import secrets
import subprocess
import sys

import pydantic
import pytest
import yaml

from deployments.config.app_args import ServedApp
from tests.test_k8s import (KEYS_SECRET, ROOT, docs_of, embedded_serve_config, load_generator, ray_containers,
                            rayservices, validate)

MOUNT = "/etc/llm-serving/tenancy"
KEY = "tenants.yaml"
EXAMPLE = "tenants-secret.example.yaml"
NAMES = sorted(load_generator().MANIFESTS)


def tenancy_volume_and_mount(spec: dict, container: dict) -> tuple[dict, dict]:
    [volume] = [v for v in spec["volumes"] if "secret" in v and v["secret"]["secretName"] == KEYS_SECRET]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    return volume, mount


@pytest.mark.parametrize("name", NAMES)
def test_every_ray_pod_mounts_the_key_secret_read_only_and_updatable(name):
    """Head and every worker group: a router replica may be placed on any Ray node."""
    cluster = rayservices()[name]["spec"]["rayClusterConfig"]
    pods = ray_containers(cluster)
    assert len(pods) == 1 + len(cluster["workerGroupSpecs"])
    for group, spec, container in pods:
        volume, mount = tenancy_volume_and_mount(spec, container)
        secret = volume["secret"]
        assert secret["items"] == [{"key": KEY, "path": KEY}], group
        assert secret.get("optional") is False, group  # no Secret: the pod waits, it never starts open
        assert mount["mountPath"] == MOUNT and mount["readOnly"] is True, group
        # The whole volume, never subPath: the kubelet does not update subPath mounts when the Secret changes.
        assert not {"subPath", "subPathExpr"} & set(mount), group
        assert not any(m.get("subPath") or m.get("subPathExpr") for m in container["volumeMounts"]
                       if m["name"] == volume["name"]), group


@pytest.mark.parametrize("name", NAMES)
def test_the_routers_keys_file_is_the_mounted_secret_key(name):
    cluster = rayservices()[name]["spec"]["rayClusterConfig"]
    keys_file = ServedApp.from_config_app(embedded_serve_config(name)["applications"][0]).router.tenancy.keys_file
    assert keys_file is not None
    for group, spec, container in ray_containers(cluster):
        volume, mount = tenancy_volume_and_mount(spec, container)
        assert posixpath.dirname(keys_file) == mount["mountPath"], group
        assert posixpath.basename(keys_file) in {item["path"] for item in volume["secret"]["items"]}, group


@pytest.mark.parametrize("keys_secret", [None, ""])
@pytest.mark.parametrize("name", NAMES)
def test_rendering_a_rayservice_without_a_key_secret_is_refused(name, keys_secret):
    generator = load_generator()
    with pytest.raises(generator.MissingKeysSecret, match="--keys-secret NAME") as refused:
        generator.render(name, keys_secret)
    assert "open to anyone" in str(refused.value)


@pytest.mark.parametrize("bad", ["Tenants", "llm_serving", "-tenants", "a" * 254, "x/y"])
def test_a_key_secret_that_is_not_a_secret_name_is_refused(bad):
    generator = load_generator()
    with pytest.raises(generator.MissingKeysSecret, match="not a Kubernetes Secret name"):
        generator.render("rayservice.yaml", bad)


@pytest.mark.parametrize("argv", [[], ["--check"]])
def test_generate_without_a_key_secret_exits_non_zero_and_writes_nothing(argv, monkeypatch, tmp_path, capsys):
    generator = load_generator()
    monkeypatch.setattr(generator, "K8S", tmp_path)
    assert generator.main(argv) == 2
    err = capsys.readouterr().err
    assert "--keys-secret NAME" in err and "open to anyone" in err and f"--keys-secret {KEYS_SECRET}" in err
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the files that need no Secret


def test_the_command_line_refuses_without_a_key_secret_and_checks_with_it():
    script = [sys.executable, str(ROOT / "k8s" / "generate.py")]
    refused = subprocess.run([*script, "--check"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--keys-secret NAME" in refused.stderr, refused.stderr[-2000:]
    checked = subprocess.run([*script, "--keys-secret", KEYS_SECRET, "--check"], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert checked.returncode == 0, checked.stderr[-2000:]


@pytest.mark.parametrize("name", NAMES)
def test_another_secret_name_changes_only_the_volumes_and_still_validates(name):
    generator = load_generator()
    rendered = yaml.safe_load(generator.render(name, "acme.llm-keys"))
    validate(rendered)  # KubeRay v1.7's CRD (skipped without ../shared/kuberay)
    committed = json.dumps(rayservices()[name])
    assert committed.count(f'"{KEYS_SECRET}"') == len(ray_containers(rayservices()[name]["spec"]["rayClusterConfig"]))
    assert json.dumps(rendered) == committed.replace(f'"{KEYS_SECRET}"', '"acme.llm-keys"')


def test_the_example_secret_is_the_one_mounted_and_holds_no_usable_digest():
    from deployments.tenancy.tenants import TenantsFile  # the router's own parser

    generator = load_generator()
    assert (generator.COMMITTED_KEYS_SECRET, generator.TENANTS_FILE) == (KEYS_SECRET, f"{MOUNT}/{KEY}")
    [secret] = docs_of(EXAMPLE)
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == KEYS_SECRET
    assert set(secret["stringData"]) == {KEY}
    tenants = yaml.safe_load(secret["stringData"][KEY])
    # As shipped, its placeholders are no digests: a router given it refuses to start rather than run open.
    with pytest.raises(pydantic.ValidationError, match="64 hex digits"):
        TenantsFile.model_validate(tenants)
    for tenant in tenants["tenants"].values():
        tenant["key_sha256"] = [hashlib.sha256(secrets.token_bytes(16)).hexdigest() for _ in tenant["key_sha256"]]
    parsed = TenantsFile.model_validate(tenants)
    assert parsed.tenants and all(t.tier in parsed.tiers for t in parsed.tenants.values())


def test_docs_name_the_same_secret_and_the_option():
    text = (ROOT / "docs" / "k8s.md").read_text()
    assert f"kubectl create secret generic {KEYS_SECRET} --from-file={KEY}" in text
    assert f"--keys-secret {KEYS_SECRET}" in text and 'printf %s "$KEY" | sha256sum' in text
    example = (ROOT / "k8s" / EXAMPLE).read_text()
    assert f"kubectl create secret generic {KEYS_SECRET} --from-file={KEY}" in example
