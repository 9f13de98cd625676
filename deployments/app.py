"""The Serve application builder: ``import_path: deployments.app:build_app``.

Reads the ``args`` of serve_config.yaml, builds one LLM deployment per pool of
the selected profile or layout with ray.serve.llm, and puts the router in
front of them.
"""

from __future__ import annotations

from typing import Any, Dict

from ray import serve
from ray.serve.deployment import Application
from ray.serve.llm import build_llm_deployment
from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata

from deployments.config.app_args import AppArgs
from deployments.config.names import ROUTER_DEPLOYMENT, TENANT_LEDGER_DEPLOYMENT, deployment_name_prefix
from deployments.router.ingress import router_ingress_class
from deployments.router.tenants import OPEN_WARNING
from deployments.server.llm_server import ObservedLLMServer
from deployments.tenancy.ledger import TenantLedger
from deployments.tenancy.tenants import load as load_tenants


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
    app_args = AppArgs.model_validate(args)
    pool_apps, pool_routes, llm_configs = {}, [], {}
    for pool in app_args.pools:
        llm_config = llm_configs[pool.name] = pool.as_profile().to_llm_config(server_cls=ObservedLLMServer)
        llm_config.deployment_config = without_serve_delays(llm_config.deployment_config)
        pool_apps[pool.name] = build_llm_deployment(llm_config, name_prefix=deployment_name_prefix(pool.name))
        pool_routes.append({"name": pool.name, "classes": pool.classes, "max_model_len": pool.profile.max_model_len,
                            "engine_priority": pool.profile.engine_priority,
                            "queues": app_args.queue_settings(pool.profile).model_dump()})
    primary = app_args.pools[0].name
    primary_config = llm_configs[primary]  # all pools serve this one model
    model_id = primary_config.model_id
    router = app_args.router
    router_cls = router_ingress_class(router.admission.max_request_bytes, router.tenancy, router.cors)
    return serve.deployment(router_cls, name=ROUTER_DEPLOYMENT, **without_serve_delays(app_args.router_deployment)).bind(
        # OpenAiIngress keys replicas by model; the router picks among the pools itself.
        llm_deployments={model_id: pool_apps[primary]},
        model_cards={model_id: to_model_metadata(model_id, primary_config)},
        pool_deployments=pool_apps,
        pool_routes=pool_routes,
        router_settings=router.model_dump(exclude={"deployment"}),
        tokenizer_source=primary_config.model_loading_config.model_source,
        tenant_ledger=_tenant_ledger(router.tenancy.keys_file),
    )


def _tenant_ledger(keys_file):
    """The quota every router replica leases from; only with keys. Without them, say loudly that it is open."""
    if keys_file is None:
        print(f"WARNING: {OPEN_WARNING}", flush=True)
        return None
    load_tenants(keys_file)  # a missing or malformed tenants file fails the deploy, not the first request
    # Fixed at one replica: it holds the buckets (listed so the app's autoscaling policy leaves it be).
    return serve.deployment(TenantLedger, name=TENANT_LEDGER_DEPLOYMENT,
                            ray_actor_options={"num_cpus": 0.05},
                            # Each router replica renews every second: no access-log line per call.
                            logging_config={"enable_access_log": False},
                            autoscaling_config={"min_replicas": 1, "max_replicas": 1, **NO_SERVE_DELAYS}).bind()
