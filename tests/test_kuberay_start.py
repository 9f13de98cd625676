"""What KubeRay v1.7 would run, run for real: the `ray start` command lines of every generated manifest.

A CRD schema cannot see what the operator does with `rayStartParams` and the group-level `resources`
map, so this module rebuilds, from each generated RayService, the exact container command KubeRay's
operator gives the head and each worker group, following KubeRay v1.7's
ray-operator/controllers/ray/common/pod.go (functions named at each step below), runs it through
`/bin/bash -c` on this machine (a real head, a real worker joined with `--address`), and asks a driver
connected to that cluster whether the node registered the custom resources the profiles' bundles ask
for and whether a placement group shaped like the pool's replica (GPU replaced by CPU) schedules on it.

Parametrized over the resources' form, it fails on the old unquoted `rayStartParams.resources:
'{"gpu_4090d": 4}'` (strict xfail: the shell splits the JSON and `ray start` refuses the rest) and
passes on KubeRay's own quoted sample form `'"{\\"Custom1\\": 1}"'`, so it checks KubeRay's behaviour,
not only itself. The autoscaler's view of the same groups comes from Ray's own KubeRay parsing code.

Only what this machine needs differs from the pod's command line, each listed in `LOCAL_OVERRIDES`:
ports apart from every default (another Ray cluster, the suite's own, may run here), the dashboard off,
a private `--temp-dir`, `--num-gpus=0`, small CPU/memory/object-store figures, the head's address.
Everything is stopped by escalation on the process groups this module started (SIGTERM, SIGKILL, then
any straggler naming our temp dir, by pid); never `ray stop`, which would stop every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from decimal import ROUND_UP, Decimal
from pathlib import Path

import pytest
import yaml

from deployments.config.app_args import AppArgs, ServedApp
from tests.test_k8s import load_generator, rayservices

pytestmark = pytest.mark.runs_first  # before the session cluster; separate ports and temp dir anyway

HEAD_FQDN = "llm-serving-head-svc.default.svc.cluster.local"  # stands for utils.GenerateFQDNServiceName
STANDARD = {"CPU", "GPU", "TPU", "memory"}


# --- KubeRay v1.7, ray-operator/controllers/ray/common/pod.go, in the order the operator applies it ---

def quantity(text: str) -> Decimal:
    """k8s.io/apimachinery resource.ParseQuantity (Ray's own port of it)."""
    from ray.autoscaler._private.kuberay.utils import parse_quantity

    return parse_quantity(text)


def go_json(resources: dict[str, float]) -> str:
    """Go's json.Marshal of a map[string]float64: sorted keys, no spaces, 4 not 4.0."""
    return "{" + ",".join(f"{json.dumps(k)}:{int(v) if float(v).is_integer() else float(v)!r}"
                          for k, v in sorted(resources.items())) + "}"


def is_gpu_resource_key(key: str) -> bool:
    """utils/resources.go, IsGPUResourceKey (MIG slices aside)."""
    return key.endswith("gpu")


def update_ray_start_params_resources(params: dict, group_resources: dict | None) -> None:
    """pod.go, updateRayStartParamsResources: the group-level `resources` map becomes
    num-cpus / memory / num-gpus, and every other key joins one JSON object that the operator wraps in
    single quotes: --resources='{"gpu_4090d":4}'."""
    if not group_resources:
        return
    custom = {}
    for name, text in group_resources.items():
        q = quantity(text)
        lower = name.lower()
        if lower == "cpu":
            params["num-cpus"] = str(int(q.to_integral_value(ROUND_UP)))
        elif lower == "memory":
            params["memory"] = str(int(q.to_integral_value(ROUND_UP)))
        elif is_gpu_resource_key(lower):
            params["num-gpus"] = str(int(q.to_integral_value(ROUND_UP)))
        else:
            custom[name] = float(q)
    if custom:
        params["resources"] = f"'{go_json(custom)}'"


def update_ray_start_params_labels(params: dict, group_labels: dict | None) -> None:
    """pod.go, updateRayStartParamsLabels."""
    if group_labels:
        params["labels"] = ",".join(f"{k}={group_labels[k]}" for k in sorted(group_labels))


def set_missing_ray_start_params(params: dict, head: bool, head_port: str) -> None:
    """pod.go, setMissingRayStartParams."""
    if not head:
        params.setdefault("address", f"{HEAD_FQDN}:{head_port}")
    else:
        params.setdefault("dashboard-host", "0.0.0.0")
    params.setdefault("metrics-export-port", "8080")  # utils.DefaultMetricsPort
    params["block"] = "true"
    params.setdefault("dashboard-agent-listen-port", "52365")  # utils.DefaultDashboardAgentListenPort


def generate_ray_start_command(head: bool, params: dict, container_resources: dict) -> str:
    """pod.go, generateRayStartCommand (with addWellKnownAcceleratorResources for nvidia.com/gpu)."""
    limits, requests = container_resources.get("limits", {}), container_resources.get("requests", {})
    if "num-cpus" not in params:
        cpu = limits.get("cpu") or requests.get("cpu")
        if cpu and quantity(cpu) != 0:
            params["num-cpus"] = str(int(quantity(cpu).to_integral_value(ROUND_UP)))
    if "memory" not in params and limits.get("memory"):
        params["memory"] = str(int(quantity(limits["memory"]).to_integral_value(ROUND_UP)))
    for key in sorted(limits):  # addWellKnownAcceleratorResources
        if "num-gpus" not in params and is_gpu_resource_key(key) and quantity(limits[key]) != 0:
            params["num-gpus"] = str(int(quantity(limits[key]).to_integral_value(ROUND_UP)))
    return ("ray start --head" if head else "ray start") + " " + convert_param_map(params)


def convert_param_map(params: dict) -> str:
    """pod.go, convertParamMap: sorted keys, `--key=value` pasted as is (no shell quoting), "true" a bare
    flag and "false" dropped except for the few flags that take an explicit boolean."""
    special = {"log-color", "include-dashboard", "include-log-monitor"}
    flags = ""
    for key in sorted(params):
        value = params[key]
        if value.lower() in ("true", "false") and key not in special:
            if value.lower() == "true":
                flags += f" --{key} "
        else:
            flags += f" --{key}={value} "
    return flags


def ray_start_params(cluster: dict, group: dict, head: bool) -> dict:
    """DefaultHeadPodTemplate / DefaultWorkerPodTemplate, then configureGCSFaultTolerance."""
    params = dict(group.get("rayStartParams") or {})
    update_ray_start_params_resources(params, group.get("resources"))
    update_ray_start_params_labels(params, group.get("labels"))
    head_port = cluster["headGroupSpec"].get("rayStartParams", {}).get("port", "6379")  # GetHeadPort
    set_missing_ray_start_params(params, head, head_port)
    if head and cluster.get("enableInTreeAutoscaling"):
        params["no-monitor"] = "true"  # the autoscaler runs as a sidecar instead
    ft = cluster.get("gcsFaultToleranceOptions")
    if head and ft and ft.get("backend", "redis") == "redis" and ft.get("redisPassword"):
        params["redis-password"] = "$REDIS_PASSWORD"  # configureRedisFT; the env var comes from the Secret
    return params


def container_args(cluster: dict, group: dict, head: bool) -> tuple[str, str]:
    """BuildPod: the Ray container runs `/bin/bash -c -- "<ulimit>; <ray start ...>"` (GetContainerCommand).
    Returns (that shell string, the `ray start` line alone)."""
    [container] = [c for c in group["template"]["spec"]["containers"] if c["name"].startswith("ray-")]
    line = generate_ray_start_command(head, ray_start_params(cluster, group, head), container.get("resources", {}))
    return f"ulimit -n ${{RAY_START_ULIMIT_OPEN_FILES:-65536}}; {line}", line


def kuberay_env(cluster: dict, group: dict, head: bool, token: str) -> dict:
    """The container's plain env plus what the operator injects (token auth, GCS FT reconnect window)."""
    [container] = [c for c in group["template"]["spec"]["containers"] if c["name"].startswith("ray-")]
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    if (cluster.get("authOptions") or {}).get("mode") == "token":  # SetContainerTokenAuthEnvVars
        env.setdefault("RAY_AUTH_MODE", "token")
        env["RAY_AUTH_TOKEN"] = token  # from the Secret the operator creates
    if cluster.get("gcsFaultToleranceOptions"):
        if not head:
            env.setdefault("RAY_GCS_RPC_SERVER_RECONNECT_TIMEOUT_S", "600")
        else:
            env["REDIS_PASSWORD"] = "unused-locally"  # no RAY_REDIS_ADDRESS here: GCS keeps state in memory
    return env


# --- the forms under test ------------------------------------------------------------------------------

def quoted_sample_form(resources: dict) -> str:
    """KubeRay's own samples: rayStartParams.resources: '"{\\"Custom1\\": 1}"'."""
    return '"' + json.dumps(resources).replace('"', '\\"') + '"'


def with_form(group: dict, form: str) -> dict:
    group = copy.deepcopy(group)
    if form == "generated":
        return group
    advertised = {k: int(quantity(v)) for k, v in group.pop("resources").items()}
    params = group.setdefault("rayStartParams", {})
    params["resources"] = json.dumps(advertised) if form == "old-unquoted" else quoted_sample_form(advertised)
    return group


FORMS = ["generated", "kuberay-quoted-sample",
         pytest.param("old-unquoted", marks=pytest.mark.xfail(strict=True, reason="unquoted: the shell splits it, the autoscaler cannot parse it"))]


def gpu_groups() -> list[tuple[str, str]]:
    return [(name, group["groupName"]) for name, doc in sorted(rayservices().items())
            for group in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"] if group.get("resources")]


def cluster_of(manifest: str) -> dict:
    return rayservices()[manifest]["spec"]["rayClusterConfig"]


def group_of(manifest: str, name: str) -> dict:
    [group] = [g for g in cluster_of(manifest)["workerGroupSpecs"] if g["groupName"] == name]
    return group


def pools_of(manifest: str, group_name: str) -> list:
    """The pools whose bundles land on this worker group (generate.py names groups after node pools)."""
    serve_config = yaml.safe_load(rayservices()[manifest]["spec"]["serveConfigV2"])
    args = AppArgs.model_validate(serve_config["applications"][0]["args"])
    generator = load_generator()
    return [pool for pool in args.pools
            if (f"gpu-{pool.pool.node_pool}" if pool.pool.node_pool else generator.DEFAULT_GROUP) == group_name]


def bundles_as_cpu(pool) -> tuple[list[dict], str]:
    """The pool's replica placement group with each GPU turned into one more CPU."""
    pg = pool.llm_config_fields()["placement_group_config"]
    bundles = []
    for bundle in pg["bundles"]:
        shaped = {k: v for k, v in bundle.items() if k != "GPU"}
        shaped["CPU"] = shaped.get("CPU", 0) + bundle.get("GPU", 0)
        bundles.append(shaped)
    return bundles, pg.get("strategy", "PACK")


# --- the autoscaler's view, from Ray's own code ----------------------------------------------------------

@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("manifest, group_name", gpu_groups())
def test_autoscaler_reads_the_groups_custom_resources(manifest, group_name, form):
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cluster = copy.deepcopy(cluster_of(manifest))
    cluster["workerGroupSpecs"] = [with_form(g, form) if g["groupName"] == group_name else g
                                   for g in cluster["workerGroupSpecs"]]
    ray_cr = {"metadata": {"name": "llm-serving", "namespace": "default"}, "spec": cluster}
    node_type = _derive_autoscaling_config_from_ray_cr(ray_cr)["available_node_types"][group_name]
    wanted = {k: int(quantity(v)) for k, v in group_of(manifest, group_name)["resources"].items()}
    assert {k: v for k, v in node_type["resources"].items() if k in wanted} == wanted
    container = group_of(manifest, group_name)["template"]["spec"]["containers"][0]
    assert node_type["resources"]["GPU"] == int(container["resources"]["limits"]["nvidia.com/gpu"])
    for pool in pools_of(manifest, group_name):  # the autoscaler can place one replica on a fresh node
        for bundle in pool.llm_config_fields()["placement_group_config"]["bundles"]:
            assert all(node_type["resources"].get(k, 0) >= v for k, v in bundle.items()), (bundle, node_type)


# KubeRay v1.7's own cases for updateRayStartParamsResources (pod_test.go, TestUpdateRayStartParamsResources).
KUBERAY_CASES = [
    ({"existing": "true"}, None, {"existing": "true"}),
    ({}, {"cpu": "2", "memory": "4Gi"}, {"num-cpus": "2", "memory": "4294967296"}),
    ({}, {"CPU": "2", "GPU": "4"}, {"num-cpus": "2", "num-gpus": "4"}),
    ({}, {"nvidia.com/gpu": "1", "TPU": "4"}, {"num-gpus": "1", "resources": "'{\"TPU\":4}'"}),
    ({"num-cpus": "1", "memory": "1000", "resources": "'{\"Custom-Resource\": 10}'"},
     {"cpu": "4", "Custom-Resource": "5"},
     {"num-cpus": "4", "memory": "1000", "resources": "'{\"Custom-Resource\":5}'"}),
]


@pytest.mark.parametrize("params, group_resources, expected", KUBERAY_CASES)
def test_port_agrees_with_kuberays_own_unit_tests(params, group_resources, expected):
    params = dict(params)
    update_ray_start_params_resources(params, group_resources)
    assert params == expected


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("manifest, group_name", gpu_groups())
def test_the_shells_words_parse_as_ray_starts_options(manifest, group_name, form):
    """Without starting Ray: bash splits the container's line into words (printed by a stand-in for
    `ray`), and `ray start`'s own click command parses them; --resources must come out as the group's map.
    The old unquoted form leaves a stray `4}` word that `ray start` refuses (UsageError)."""
    import click
    from ray.scripts.scripts import start

    group = with_form(group_of(manifest, group_name), form)
    shell, _ = container_args(cluster_of(manifest), group, head=False)
    words = subprocess.run(["/bin/bash", "-c", f"ray() {{ printf '%s\\0' \"$@\"; }}; {shell}"],
                           capture_output=True, text=True, check=True).stdout.split("\0")[:-1]
    assert words[0] == "start"
    try:
        ctx = start.make_context("start", words[1:])
    except click.UsageError as exc:
        pytest.fail(f"ray start refuses the line: {exc}")
    wanted = {k: int(quantity(v)) for k, v in group_of(manifest, group_name)["resources"].items()}
    assert json.loads(ctx.params["resources"]) == wanted
    assert ctx.params["block"] is True and ctx.params["num_gpus"] == 4


def test_command_lines_are_kuberays():
    """The rendering itself, on the single-profile manifest: what pod.go would produce, byte for byte."""
    cluster = cluster_of("rayservice.yaml")
    worker = group_of("rayservice.yaml", "gpu-4090d")
    _, line = container_args(cluster, worker, head=False)
    assert " --resources='{\"gpu_4090d\":4}' " in line
    assert f" --address={HEAD_FQDN}:6379 " in line and " --block " in line
    assert " --num-gpus=4 " in line and " --num-cpus=14 " in line
    assert shlex.split(line)[0:2] == ["ray", "start"]
    old = container_args(cluster, with_form(worker, "old-unquoted"), head=False)[1]
    assert ' --resources={"gpu_4090d": 4} ' in old  # pasted as is: two shell words
    _, head_line = container_args(cluster, cluster["headGroupSpec"], head=True)
    assert head_line.startswith("ray start --head ") and " --no-monitor " in head_line
    assert " --redis-password=$REDIS_PASSWORD " in head_line  # configureRedisFT: the shell expands it
    assert " --num-cpus=0 " in head_line and " --object-store-memory=" in head_line


# --- run it ------------------------------------------------------------------------------------------------

# Ports: outside Ray's default worker port range (10002-19999) and every default component port.
LOCAL_OVERRIDES = ("port", "address", "include-dashboard", "dashboard-port", "metrics-export-port",
                   "dashboard-agent-listen-port", "ray-client-server-port", "temp-dir", "num-gpus",
                   "num-cpus", "memory", "object-store-memory")


def free_port(start: int) -> int:
    for port in range(start, start + 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError(f"no free port from {start}")


def localize(shell_line: str, overrides: dict) -> str:
    """The pod's `ray start` line with this machine's values: each `--key=value` (or bare `--key`) of
    LOCAL_OVERRIDES replaced or added; everything else, --resources included, stays byte for byte."""
    assert set(overrides) <= set(LOCAL_OVERRIDES)
    words = shell_line.split(" ")
    kept = [w for w in words if not any(w == f"--{k}" or w.startswith(f"--{k}=") for k in overrides)]
    return " ".join(kept) + " " + " ".join(f"--{k}={v}" for k, v in overrides.items())


class LocalRay:
    """Nodes started from KubeRay's command lines, each `ray start --block` in its own process group."""

    def __init__(self, temp_dir: str):
        self.temp_dir = temp_dir
        self.procs: list[subprocess.Popen] = []

    def start(self, shell_args: str, env: dict, log: str) -> subprocess.Popen:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        full_env.update(env)
        full_env.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_prestart_worker_first_driver": "0",
                         "RAY_enable_worker_prestart": "0",
                         "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"})
        proc = subprocess.Popen(["/bin/bash", "-c", "--", shell_args], env=full_env, cwd=self.temp_dir,
                                stdout=open(Path(self.temp_dir) / log, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        """SIGTERM the group (`ray start --block` stops its node), then SIGKILL whatever is left of it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(8)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        # Stragglers that left the group (daemonized): only processes naming our private temp dir, by pid.
        for _ in range(3):
            found = subprocess.run(["pgrep", "-f", self.temp_dir], capture_output=True, text=True).stdout.split()
            pids = [int(p) for p in found if int(p) != os.getpid()]
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(1)


DRIVER = textwrap.dedent("""
    import json, sys, time
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    address, wanted, bundles, strategy, before = sys.argv[1:6]
    wanted, bundles, before = json.loads(wanted), json.loads(bundles), set(json.loads(before))
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    out = {}
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        new = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] not in before
               and "node:__internal_head__" not in n["Resources"]]
        if new:
            out["node"] = new[0]["Resources"]
            break
        time.sleep(0.5)
    out = {**out, "cluster": ray.cluster_resources(), "nodes": [n["NodeID"] for n in ray.nodes()]}
    if "node" in out and bundles:
        pg = placement_group(bundles, strategy=strategy)
        try:
            ray.get(pg.ready(), timeout=30)
            out["placement_group"] = "ready"
        except Exception as e:
            out["placement_group"] = repr(e)[:300]
        remove_placement_group(pg)
    ray.shutdown()
    print("RESULT " + json.dumps(out))
""")


def drive(address: str, env: dict, temp_dir: str, bundles: list, strategy: str, before: list[str],
          worker: subprocess.Popen, worker_log: Path) -> dict:
    """A driver on the cluster: the new worker node's resources, ray.cluster_resources(), and whether the
    placement group schedules. Gives up at once if the worker's `ray start` exits (it blocks when fine)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    full_env.update(env)
    full_env["RAY_USAGE_STATS_ENABLED"] = "0"
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, address, "{}", json.dumps(bundles), strategy,
                               json.dumps(before)], env=full_env, cwd=temp_dir, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 100
        while driver.poll() is None and time.monotonic() < deadline:
            if worker.poll() is not None:
                pytest.fail(f"the worker's `ray start` exited {worker.returncode}:\n{worker_log.read_text()[-3000:]}")
            time.sleep(0.5)
        stdout, stderr = driver.communicate(timeout=10)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    [line] = [l for l in stdout.splitlines() if l.startswith("RESULT ")] or [None]
    assert line, f"driver failed ({driver.returncode}):\n{stderr[-3000:]}"
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def token() -> str:
    return secrets.token_hex(16)


class Heads:
    """One head per manifest, started from KubeRay's command line on ports apart from every default, kept
    while that manifest's groups run (the previous manifest's head is stopped when the next one starts)."""

    def __init__(self, token: str):
        self.token = token
        self.current: dict | None = None

    def get(self, manifest: str) -> dict:
        if self.current and self.current["manifest"] == manifest:
            return self.current
        self.close()
        cluster = cluster_of(manifest)
        temp_dir = tempfile.mkdtemp(prefix="krs-", dir="/tmp")  # short: Unix socket paths
        nodes = LocalRay(temp_dir)
        self.current = {"manifest": manifest, "nodes": nodes, "temp_dir": temp_dir, "known": []}
        port = free_port(6390)
        shell, _ = container_args(cluster, cluster["headGroupSpec"], head=True)
        env = kuberay_env(cluster, cluster["headGroupSpec"], True, self.token)
        local = localize(shell, {"port": port, "include-dashboard": "false",
                                 "metrics-export-port": free_port(26080),
                                 "dashboard-agent-listen-port": free_port(26265),
                                 "ray-client-server-port": free_port(26001), "temp-dir": temp_dir,
                                 "num-gpus": 0, "memory": 1_000_000_000, "object-store-memory": 80_000_000})
        proc = nodes.start(local, env, "head.log")
        address = f"127.0.0.1:{port}"
        self.current.update(address=address, env=env)
        # What KubeRay's wait-gcs-ready init container runs before a worker starts (DefaultWorkerPodTemplate).
        check = [str(Path(sys.executable).parent / "ray"), "health-check", "--address", address]
        clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | env
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if subprocess.run(check, env=clean, capture_output=True).returncode == 0:
                return self.current
            time.sleep(1)
        pytest.fail(f"head did not come up:\n{(Path(temp_dir) / 'head.log').read_text()[-3000:]}")

    def close(self) -> None:
        if not self.current:
            return
        current, self.current = self.current, None
        current["nodes"].stop_all()
        after = subprocess.run(["pgrep", "-af", "raylet|gcs_server"], capture_output=True, text=True).stdout
        assert current["temp_dir"] not in after, "a Ray process of ours outlived the escalation"
        reap_zombies()
        shutil.rmtree(current["temp_dir"], ignore_errors=True)  # logs and session files


def reap_zombies() -> None:
    """Reap exited children of this process: a killed node's gcs_server and raylet can end up as our
    zombies (under CI's make/flock they were), and the session's start check saw them as a cluster."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


@pytest.fixture(scope="module")
def heads(token):
    heads = Heads(token)
    yield heads
    heads.close()


def worker_cases():
    """Every GPU group of every manifest as generated, the single-profile one also in the two
    rayStartParams forms; the router group of the single-profile manifest."""
    cases = []
    for manifest, group_name in [*gpu_groups(), ("rayservice.yaml", load_generator().ROUTER_GROUP)]:
        for form in FORMS if (manifest, group_name) == ("rayservice.yaml", "gpu-4090d") else ["generated"]:
            value, marks = (form, ()) if isinstance(form, str) else (form.values[0], form.marks)
            cases.append(pytest.param(manifest, group_name, value, marks=marks,
                                      id=f"{manifest}-{group_name}-{value}"))
    return cases


@pytest.mark.parametrize("manifest, group_name, form", worker_cases())
def test_worker_group_starts_with_the_bundles_resources(heads, manifest, group_name, form):
    head = heads.get(manifest)
    cluster = cluster_of(manifest)
    group = with_form(group_of(manifest, group_name), form)
    pools = pools_of(manifest, group_name)
    if group_name == load_generator().ROUTER_GROUP:  # no custom resources; room for its share of routers
        serve_config = yaml.safe_load(rayservices()[manifest]["spec"]["serveConfigV2"])
        router = ServedApp.from_config_app(serve_config["applications"][0]).router_deployment
        bundles = [{"CPU": router["ray_actor_options"]["num_cpus"]}] * router["max_replicas_per_node"]
        strategy = "STRICT_PACK"
    else:
        assert pools, f"no pool lands on {group_name}"
        bundles, strategy = bundles_as_cpu(pools[-1])  # the group's largest replica shape comes last
    need_cpus = math.ceil(sum(b.get("CPU", 0) for b in bundles))
    shell, _ = container_args(cluster, group, head=False)
    env = kuberay_env(cluster, group, False, head["env"].get("RAY_AUTH_TOKEN", ""))
    local = localize(shell, {"address": head["address"], "metrics-export-port": free_port(27080),
                             "dashboard-agent-listen-port": free_port(27265), "temp-dir": head["temp_dir"],
                             "num-gpus": 0, "num-cpus": need_cpus, "memory": 1_000_000_000,
                             "object-store-memory": 80_000_000})
    log = Path(head["temp_dir"]) / f"{group_name}-{form}.log"
    proc = head["nodes"].start(local, env, log.name)
    try:
        seen = drive(head["address"], head["env"], head["temp_dir"], bundles, strategy, head["known"], proc, log)
        head["known"] = seen["nodes"]
        assert "node" in seen, f"the worker never registered; `ray start` said:\n{log.read_text()[-2000:]}"
        wanted = {k: int(quantity(v)) for k, v in group_of(manifest, group_name).get("resources", {}).items()}
        assert {k: seen["node"].get(k) for k in wanted} == wanted
        assert all(seen["cluster"].get(k, 0) >= v for k, v in wanted.items())  # ray.cluster_resources()
        assert "GPU" not in seen["node"]
        for pool in pools:  # every bundle key the profiles ask for is advertised
            for bundle in pool.llm_config_fields()["placement_group_config"]["bundles"]:
                assert set(bundle) - {"CPU", "GPU"} <= set(seen["node"]), bundle
        assert seen["placement_group"] == "ready", seen
    finally:
        head["nodes"].stop(proc)
