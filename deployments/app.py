"""The Serve application builder: ``import_path: deployments.app:build_app``.

Reads the ``args`` of serve_config.yaml, builds the selected profile's LLM
deployment with ray.serve.llm, and puts the router in front of it.
"""

from __future__ import annotations

from typing import Any, Dict

from ray import serve
from ray.serve.deployment import Application
from ray.serve.llm import build_llm_deployment
from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata

from deployments.config.app_args import AppArgs
from deployments.router.ingress import router_ingress_class
from deployments.server.llm_server import ObservedLLMServer


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
    profile = app_args.selected
    llm_config = profile.to_llm_config(server_cls=ObservedLLMServer)
    llm_config.deployment_config = without_serve_delays(llm_config.deployment_config)
    router = app_args.router
    router_cls = router_ingress_class(router.admission.max_request_bytes)
    return serve.deployment(router_cls, name="Router", **without_serve_delays(router.deployment)).bind(
        llm_deployments={llm_config.model_id: build_llm_deployment(llm_config)},
        model_cards={llm_config.model_id: to_model_metadata(llm_config.model_id, llm_config)},
        router_settings=router.model_dump(exclude={"deployment"}),
        tokenizer_source=llm_config.model_loading_config.model_source,
        max_model_len=profile.max_model_len,
        engine_priority=profile.engine_priority,
    )
