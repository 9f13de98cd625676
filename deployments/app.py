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


def build_app(args: Dict[str, Any]) -> Application:
    app_args = AppArgs.model_validate(args)
    llm_config = app_args.selected.to_llm_config()
    llm_deployment = build_llm_deployment(llm_config)
    return serve.deployment(router_ingress_class(), name="Router", **app_args.router.deployment).bind(
        llm_deployments={llm_config.model_id: llm_deployment},
        model_cards={llm_config.model_id: to_model_metadata(llm_config.model_id, llm_config)},
    )
