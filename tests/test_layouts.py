"""Unit tests: layouts (pools across node pools) and the router's choice of pool."""

from __future__ import annotations

import copy

import pytest
from pydantic import ValidationError

from deployments.config.app_args import AppArgs, load_serve_config
from deployments.config.layouts import node_pool_resource
from deployments.config.names import deployment_name_prefix, pool_of_deployment
from deployments.router.pools import PoolRoute, choose_pool, tokens_needed
from deployments.router.settings import PriorityClass as P

TP1, TP4 = "qwen2.5-7b-4090d-tp1-fp16", "qwen2.5-7b-4090d-tp4-fp16"


@pytest.fixture
def args() -> dict:
    args = copy.deepcopy(load_serve_config()["applications"][0]["args"])
    args.pop("profile")
    return args


def with_layout(args: dict, name: str) -> AppArgs:
    return AppArgs.model_validate({**args, "layout": name})


def test_a_profile_is_served_as_one_pool_taking_every_class():
    app_args = AppArgs.model_validate(load_serve_config()["applications"][0]["args"])
    [pool] = app_args.pools
    assert (pool.name, pool.classes, pool.profile.model_id) == ("main", ["high", "medium", "low"], "SmolLM2-135M-Instruct")
    assert pool.llm_config_fields() == app_args.profiles["embedded-cpu"].llm_config  # nothing added


def test_mixed_layout_pins_each_pool_to_its_node_pool(args):
    interactive, long_context = with_layout(args, "4090d-mixed").pools
    assert (interactive.name, interactive.classes) == ("interactive", ["high", "medium"])
    assert (long_context.name, long_context.classes) == ("long-context", ["low"])
    tp1 = interactive.as_profile().to_llm_config().get_engine_config()
    tp4 = long_context.as_profile().to_llm_config().get_engine_config()
    assert tp1.placement_bundles == [{"GPU": 1.0, "CPU": 2.0, "gpu_4090d": 1, "node_pool_4090d_interactive": 1}]
    assert tp4.placement_bundles == [{"GPU": 1.0, "CPU": 2.0, "gpu_4090d": 1, "node_pool_4090d_long_context": 1}] * 4
    assert tp1.placement_strategy == tp4.placement_strategy == "STRICT_PACK"
    assert interactive.llm_config_fields()["deployment_config"]["autoscaling_config"] == {
        "min_replicas": 2, "max_replicas": 8}
    # The profiles themselves are untouched: other layouts reuse them.
    assert "node_pool_4090d_interactive" not in args["profiles"][TP1]["llm_config"]["placement_group_config"]["bundles"][0]


@pytest.mark.parametrize("layout, pools", [
    ("4090d-4x-tp1", {"interactive": (TP1, 4)}),
    ("4090d-1x-tp4", {"long-context": (TP4, 1)}),
    ("embedded-cpu-split", {"interactive": ("embedded-cpu", 1), "bulk": ("embedded-cpu", 1)}),
])
def test_single_node_layouts(args, layout, pools):
    resolved = with_layout(args, layout).pools
    assert {p.name: (p.pool.profile, p.llm_config_fields()["deployment_config"]["autoscaling_config"]["max_replicas"])
            for p in resolved} == pools


def test_cpu_split_pins_each_engine_to_its_own_core(args):
    interactive, bulk = with_layout(args, "embedded-cpu-split").pools
    for pool, core in ((interactive, "0"), (bulk, "1")):
        env = pool.llm_config_fields()["runtime_env"]["env_vars"]
        assert env["VLLM_CPU_OMP_THREADS_BIND"] == core
        assert env["HF_HUB_OFFLINE"] == "1"  # the profile's own variables stay
    assert "VLLM_CPU_OMP_THREADS_BIND" not in args["profiles"]["embedded-cpu"]["llm_config"]["runtime_env"]["env_vars"]


def test_a_class_without_a_pool_is_refused(args):
    args["layouts"]["broken"] = {"pools": {"chat": {"profile": TP1, "classes": ["high"]}}}
    with pytest.raises(ValidationError, match=r"no pool takes class\(es\) \['medium', 'low'\]"):
        with_layout(args, "4090d-mixed")


def test_unknown_layout_and_profile_names_are_refused(args):
    with pytest.raises(ValidationError, match="layout 'nope' is not defined"):
        with_layout(args, "nope")
    args["layouts"]["typo"] = {"pools": {"chat": {"profile": "qwen-typo"}}}
    with pytest.raises(ValidationError, match="layout 'typo' pool 'chat': profile 'qwen-typo' is not defined"):
        with_layout(args, "4090d-mixed")


def test_profile_and_layout_are_exclusive(args):
    with pytest.raises(ValidationError, match="exactly one of `profile` and `layout`"):
        AppArgs.model_validate({**args, "profile": TP1, "layout": "4090d-mixed"})
    with pytest.raises(ValidationError, match="exactly one of `profile` and `layout`"):
        AppArgs.model_validate(args)


def test_pools_of_one_layout_serve_one_model(args):
    args["profiles"]["other"] = copy.deepcopy(args["profiles"][TP1])
    args["profiles"]["other"]["llm_config"]["model_loading_config"]["model_id"] = "Qwen/Qwen2.5-14B-Instruct"
    args["layouts"]["two-models"] = {"pools": {"a": {"profile": TP1}, "b": {"profile": "other"}}}
    with pytest.raises(ValidationError, match="mixes models"):
        with_layout(args, "4090d-mixed")


@pytest.mark.parametrize("bad", [{"min_replicas": 3, "max_replicas": 2}, {"min_replicas": -1, "max_replicas": 2}])
def test_replica_bounds_are_checked(args, bad):
    args["layouts"]["4090d-mixed"]["pools"]["interactive"]["replicas"] = bad
    with pytest.raises(ValidationError):
        with_layout(args, "4090d-mixed")


@pytest.mark.parametrize("name", ["Interactive", "has space", "-lead", "x" * 0])
def test_pool_and_node_pool_names_are_kubernetes_safe(args, name):
    args["layouts"]["4090d-mixed"]["pools"]["interactive"]["node_pool"] = name
    with pytest.raises(ValidationError):
        with_layout(args, "4090d-mixed")
    args["layouts"]["bad-name"] = {"pools": {name or "_": {"profile": TP1}}}
    with pytest.raises(ValidationError):
        with_layout(args, "bad-name")


def test_deployment_names_carry_the_pool():
    assert pool_of_deployment(deployment_name_prefix("long-context") + "Qwen--Qwen2_5-7B-Instruct") == "long-context"
    assert pool_of_deployment("Router") is None
    assert node_pool_resource("4090d-long-context") == "node_pool_4090d_long_context"


# --- choosing a pool ----------------------------------------------------------------

INTERACTIVE = PoolRoute("interactive", frozenset({"high", "medium"}), 8192, True)
LONG = PoolRoute("long-context", frozenset({"low"}), 131072, True)
MIXED = [INTERACTIVE, LONG]


@pytest.mark.parametrize("cls, needed, expected", [
    (P.HIGH, 100, INTERACTIVE),
    (P.MEDIUM, 8192, INTERACTIVE),       # exactly fits
    (P.MEDIUM, 8193, LONG),              # spills to the pool whose context fits
    (P.LOW, 3000, LONG),                 # by class, though it would fit the interactive pool
    (P.LOW, 131072, LONG),
    (P.HIGH, 200_000, LONG),             # fits nowhere: the largest context, so admission's 400 names it
])
def test_choose_pool(cls, needed, expected):
    assert choose_pool(cls, needed, MIXED) is expected


def test_spill_prefers_the_smallest_context_that_fits():
    mid = PoolRoute("mid", frozenset({"low"}), 32768, True)
    assert choose_pool(P.HIGH, 10_000, [INTERACTIVE, LONG, mid]) is mid


def test_a_single_pool_takes_everything():
    only = PoolRoute("main", frozenset({"high", "medium", "low"}), 4096, True)
    assert all(choose_pool(cls, 10, [only]) is only for cls in P)


@pytest.mark.parametrize("prompt, requested, cap, needed", [
    (100, None, 2048, 101),   # unset: the pool must hold the prompt and one token
    (100, 50, 2048, 150),
    (100, 9000, 2048, 2148),  # clamped to the cap before routing
    (100, 0, 2048, 101),
])
def test_tokens_needed(prompt, requested, cap, needed):
    assert tokens_needed(prompt, requested, cap) == needed


# --- autoscaling per pool --------------------------------------------------------------


def test_each_pools_deployment_is_scaled_on_its_own_router_queue():
    from types import SimpleNamespace

    from deployments.autoscaling.serve_policy import _queued_for
    from deployments.autoscaling.signals import ROUTER_QUEUED, router_queued_metric

    router = SimpleNamespace(aggregated_metrics={
        ROUTER_QUEUED: {"r1": 7.0},
        router_queued_metric("interactive"): {"r1": 2.0},
        router_queued_metric("long-context"): {"r1": 5.0},
    })
    assert _queued_for(deployment_name_prefix("interactive") + "Qwen", [router]) == 2.0
    assert _queued_for(deployment_name_prefix("long-context") + "Qwen", [router]) == 5.0
    assert _queued_for("SomethingElse", [router]) == 7.0  # not one of ours: the router's total
