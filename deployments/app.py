"""The Serve application builder: ``import_path: deployments.app:build_app``.

Reads the ``args`` of serve_config.yaml, builds one LLM deployment per pool of
the selected profile or layout with ray.serve.llm, and puts the router in
front of them, beside the tenants' quota ledger. The router's settings come
from its deployment's ``user_config`` (deployments/config/app_args.py says why).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from ray import serve
from ray.serve.deployment import Application
from ray.serve.llm import build_llm_deployment
from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata

from deployments.config.app_args import AppArgs
from deployments.config.names import ROUTER_DEPLOYMENT, TENANT_LEDGER_DEPLOYMENT, deployment_name_prefix
from deployments.router.ingress import router_ingress_class
from deployments.router.pools import PoolRoute
from deployments.router.settings import RouterSettings
from deployments.server.llm_server import ObservedLLMServer
from deployments.tenancy.ledger import TenantLedger


# Serve wraps an application-level policy in its own per-deployment up/down
# delays (30 s / 600 s by default). Our policy owns hysteresis; a second layer
# resets on every "hold" tick and swallows its steps, so Serve's is switched off.
NO_SERVE_DELAYS = {"upscale_delay_s": 0, "downscale_delay_s": 0}


def without_serve_delays(deployment_options: Dict[str, Any]) -> Dict[str, Any]:
    options = dict(deployment_options)
    if "autoscaling_config" in options:
        options["autoscaling_config"] = {**options["autoscaling_config"], **NO_SERVE_DELAYS}
    return options


def build_app(args: Dict[str, Any]) -> Application:
    """The application for ``args`` (serve_config.yaml's; raises pydantic.ValidationError when they do not
    validate). The router's settings are not among them: Serve passes the Router entry's ``user_config``
    to the router replicas (``Router.reconfigure``). Serve calls builders with exactly one argument."""
    return build_app_with_router(args, None)


def build_app_with_router(args: Dict[str, Any], router_settings: Optional[Dict[str, Any]]) -> Application:
    """``build_app`` for callers that build the app in Python (``serve.run``) and so have no config
    ``deployments`` entry: ``router_settings`` is the Router's user_config (validated here); None: the
    config's entry, or the defaults."""
    app_args = AppArgs.model_validate(args)
    router_options = without_serve_delays(app_args.router_deployment)
    if router_settings is not None:
        router_options["user_config"] = RouterSettings.model_validate(router_settings).model_dump(mode="json")
    pool_apps, llm_configs = {}, {}
    for pool in app_args.pools:
        llm_config = llm_configs[pool.name] = pool.as_profile().to_llm_config(server_cls=ObservedLLMServer)
        llm_config.deployment_config = without_serve_delays(llm_config.deployment_config)
        pool_apps[pool.name] = build_llm_deployment(llm_config, name_prefix=deployment_name_prefix(pool.name))
    primary_config = llm_configs[app_args.pools[0].name]  # all pools serve this one model
    model_id = primary_config.model_id
    return serve.deployment(router_ingress_class(), name=ROUTER_DEPLOYMENT, **router_options).bind(
        # OpenAiIngress keys replicas by model; the router picks among the pools itself.
        llm_deployments={model_id: pool_apps[app_args.pools[0].name]},
        model_cards={model_id: to_model_metadata(model_id, primary_config)},
        pool_deployments=pool_apps,
        pool_routes=[PoolRoute(pool.name, frozenset(pool.classes), pool.profile.max_model_len,
                               pool.profile.engine_priority) for pool in app_args.pools],
        queue_overrides={pool.name: pool.profile.router_queues for pool in app_args.pools},
        tokenizer_source=primary_config.model_loading_config.model_source,
        tenant_ledger=_tenant_ledger(),
    )


def _tenant_ledger():
    """The quota every router replica leases from. Always deployed (one small replica), so that keys can
    be switched on in the router's user_config without a redeploy of anything else."""
    # Fixed at one replica: it holds the buckets (listed so the app's autoscaling policy leaves it be).
    return serve.deployment(TenantLedger, name=TENANT_LEDGER_DEPLOYMENT,
                            ray_actor_options={"num_cpus": 0.05},
                            # Each router replica renews every second: no access-log line per call.
                            logging_config={"enable_access_log": False},
                            autoscaling_config={"min_replicas": 1, "max_replicas": 1, **NO_SERVE_DELAYS}).bind()
