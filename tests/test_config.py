"""Unit tests: serve_config.yaml, profiles and their validation (no Ray needed)."""

from __future__ import annotations

import copy

import pytest
import yaml
from pydantic import ValidationError

from deployments.router.settings import PriorityClass as P
from deployments.config.app_args import AppArgs, ServedApp, load_serve_config
from deployments.models.embedded import EmbeddedModelError

GPU_PROFILE = "qwen2.5-7b-4090d-tp1-fp16"


@pytest.fixture
def config_app() -> dict:
    return copy.deepcopy(load_serve_config()["applications"][0])


@pytest.fixture
def args(config_app) -> dict:
    return config_app["args"]


def test_default_profile_is_the_embedded_cpu_model(args):
    app_args = AppArgs.model_validate(args)
    assert app_args.profile == "embedded-cpu"
    assert app_args.primary.uses_embedded_model
    assert app_args.primary.llm_config["accelerator_config"] == {"kind": "cpu"}


def test_gpu_profile_selected_by_configuration_alone(args):
    args["profile"] = GPU_PROFILE
    profile = AppArgs.model_validate(args).primary
    llm_config = profile.to_llm_config()  # resolves and validates without a GPU
    assert llm_config.model_id == "Qwen/Qwen2.5-7B-Instruct"
    assert llm_config.model_loading_config.model_source == "Qwen/Qwen2.5-7B-Instruct"
    engine = llm_config.engine_kwargs
    assert engine["dtype"] == "float16"
    assert engine["max_model_len"] == 8192
    assert engine["gpu_memory_utilization"] == pytest.approx(0.90)
    engine_config = llm_config.get_engine_config()
    assert engine_config.placement_bundles[0]["GPU"] == 1
    assert engine_config.placement_strategy == "STRICT_PACK"


def test_unknown_profile_names_the_choices(args):
    args["profile"] = "h100-dreams"
    with pytest.raises(ValidationError, match="embedded-cpu"):
        AppArgs.model_validate(args)


def test_invalid_engine_settings_fail_at_load_time(args):
    args["profiles"][GPU_PROFILE]["llm_config"]["deployment_config"] = {"num_replicas": "many"}
    with pytest.raises(ValidationError, match="deployment config"):
        AppArgs.model_validate(args)


def test_unknown_keys_are_refused(args):
    args["profiles"]["embedded-cpu"]["llm_confg"] = {}
    with pytest.raises(ValidationError, match="llm_confg"):
        AppArgs.model_validate(args)


def test_missing_embedded_model_gives_the_prepare_command(args, tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_SERVE_MODEL_CACHE", str(tmp_path))
    profile = AppArgs.model_validate(args).primary
    with pytest.raises(EmbeddedModelError, match="python -m deployments.models.embedded prepare"):
        profile.to_llm_config()


def test_a_profile_overrides_the_routers_queue_settings_for_its_pools(config_app):
    app = ServedApp.from_config_app(config_app)
    cpu = app.queue_settings(app.args.profiles["embedded-cpu"])
    gpu = app.queue_settings(app.args.profiles[GPU_PROFILE])
    assert cpu.max_in_flight_per_class == {"low": 1}
    assert cpu.yield_to_high == {"low": 1}
    assert gpu.max_in_flight_per_class["low"] == 2 and gpu.yield_to_high == {}
    assert gpu.classes == app.router.queues.classes  # the 4090D profiles keep web chat's SLO
    assert gpu.targets(P.HIGH).ttft_s == 1.0 and gpu.tightest_tpot_s == 0.05
    assert cpu.targets(P.MEDIUM).ttft_s > gpu.targets(P.MEDIUM).ttft_s  # a 2k prefill on one CPU core
    assert cpu.tightest_tpot_s == 0.1 and cpu.targets(P.LOW).start_deadline_s == gpu.targets(P.LOW).start_deadline_s
    assert cpu.window == gpu.window  # one window setting; what it settles at is measured
    # the CPU profile's TPOT SLO follows this machine's engine; web chat's is an absolute goal
    assert cpu.tpot_slo_from_engine == 3.0 and gpu.tpot_slo_from_engine is None


def test_a_profile_may_override_one_field_of_one_class(config_app, args):
    args["profiles"][GPU_PROFILE]["router_queues"] = {"classes": {"low": {"start_deadline_s": 60}}}
    app = ServedApp.from_config_app(config_app)
    gpu = app.queue_settings(app.args.profiles[GPU_PROFILE])
    assert gpu.targets(P.LOW).start_deadline_s == 60 and gpu.targets(P.LOW).ttft_s == 60.0
    assert gpu.targets(P.HIGH) == app.router.queues.targets(P.HIGH)


@pytest.mark.parametrize("override, message", [
    ({"window": {"initial": 0}}, "greater than or equal to 1"),
    ({"window": {"min": 8, "initial": 4}}, "min <= initial"),
    ({"classes": {"high": {"tpot_s": 0}}}, "greater than 0"),
    ({"yield_to_high": {"high": 1}}, "yield_to_high"),
    ({"max_in_fligth": 4}, "max_in_fligth"),
])
def test_bad_profile_queue_overrides_are_refused(config_app, args, override, message):
    args["profiles"][GPU_PROFILE]["router_queues"] = override
    with pytest.raises(ValidationError, match=message):
        ServedApp.from_config_app(config_app)


def test_router_settings_are_the_routers_user_config_not_args(config_app, args):
    """Serve hashes `args` into every deployment's code version: router settings there would restart
    the engines on every edit, so they are refused there with a pointer to where they live."""
    router = next(d for d in config_app["deployments"] if d["name"] == "Router")
    assert ServedApp.from_config_app(config_app).router.queues.capacity == router["user_config"]["queues"]["capacity"]
    args["router"] = {"queues": {"capacity": {"high": 1, "medium": 1, "low": 1}}}
    with pytest.raises(ValidationError, match="user_config"):
        AppArgs.model_validate(args)


def test_bad_router_settings_are_refused_offline(config_app):
    router = next(d for d in config_app["deployments"] if d["name"] == "Router")
    router["user_config"]["queues"]["capacity"]["high"] = "lots"
    with pytest.raises(ValidationError, match="capacity"):
        ServedApp.from_config_app(config_app)


def test_streaming_gpu_profiles_run_several_router_replicas_and_the_cpu_one_keeps_one(args):
    cpu = AppArgs.model_validate(args).router_deployment
    assert cpu["autoscaling_config"]["min_replicas"] == cpu["autoscaling_config"]["max_replicas"] == 1
    args["profile"] = GPU_PROFILE
    gpu = AppArgs.model_validate(args).router_deployment
    assert gpu["autoscaling_config"]["min_replicas"] == gpu["autoscaling_config"]["max_replicas"] == 4
    assert gpu["max_ongoing_requests"] == cpu["max_ongoing_requests"]  # the rest of the options stays
    del args["profile"]
    args["layout"] = "4090d-mixed"  # a layout: the largest of its pools' profiles
    assert AppArgs.model_validate(args).router_deployment["autoscaling_config"]["max_replicas"] == 4


def test_the_offline_check_passes_the_shipped_config_and_names_what_is_wrong(config_app, tmp_path, capsys):
    from deployments.config.app_args import SERVE_CONFIG_PATH, main

    assert main([str(SERVE_CONFIG_PATH)]) == 0
    router = next(d for d in config_app["deployments"] if d["name"] == "Router")
    router["user_config"]["queues"]["window"]["min"] = 0
    bad = tmp_path / "serve_bad.yaml"
    bad.write_text(yaml.safe_dump({"applications": [config_app]}))
    assert main([str(bad)]) == 1
    assert "window.min" in capsys.readouterr().err


def _code_version(config_app: dict) -> str:
    """Serve's own code version of an application config: replicas restart when it changes."""
    from ray.serve._private.deploy_utils import get_app_code_version
    from ray.serve.schema import ServeApplicationSchema

    return get_app_code_version(ServeApplicationSchema(**copy.deepcopy(config_app)))


def _router(config_app: dict) -> dict:
    from deployments.config.app_args import router_entry

    return router_entry(config_app)


@pytest.mark.parametrize("edit, restarts", [
    (lambda app: _router(app)["user_config"].setdefault("queues", {}).update(max_queue_per_class=7), False),
    (lambda app: _router(app).update(num_replicas=2, autoscaling_config=None), False),
    (lambda app: _router(app).update(max_ongoing_requests=500), False),
    # Serve hashes the list of deployment-level autoscaling policies: adding an entry restarts all.
    (lambda app: _router(app).update(autoscaling_config={"min_replicas": 2, "max_replicas": 2}), True),
    (lambda app: app["autoscaling_policy"]["policy_kwargs"].update(downscale_delay_s=30), True),
    (lambda app: app["args"]["profiles"]["embedded-cpu"]["llm_config"]["engine_kwargs"].update(max_model_len=2048),
     True),
], ids=["router-user-config", "router-num-replicas", "router-max-ongoing", "router-autoscaling-config-added",
        "policy-kwargs", "args"])
def test_readmes_table_of_edits_that_restart_engines_is_serves_own_rule(config_app, edit, restarts):
    before = _code_version(config_app)
    edit(config_app)
    assert (_code_version(config_app) != before) is restarts


def test_every_profile_turns_vllms_ray_stat_logger_off(args):
    # Ray's default (on) records one histogram observation per generated token on the LLM replica's busiest
    # core; the replica exports the engine series the dashboards read itself (engine_load.py). A new profile
    # that leaves the key out would silently turn that cost back on.
    on = [name for name, profile in args["profiles"].items()
          if profile["llm_config"].get("log_engine_metrics", True) is not False]
    assert not on, f"profiles without log_engine_metrics: false: {on}"
