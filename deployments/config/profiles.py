"""Profiles: named, complete model + hardware settings, selected by name.

Every profile lives in ``serve_config.yaml`` under ``args.profiles``; the
application serves the one named by ``args.profile``. Switching from the
embedded CPU model to Qwen2.5-7B on GPUs is a one-word change there, no code.

A profile's ``llm_config`` is ray.serve.llm's own ``LLMConfig`` schema (so
``engine_kwargs`` are vLLM's engine arguments), with one addition: a
``model_source`` of the form ``embedded:NAME`` points at the locally prepared
embedded model.
"""

from __future__ import annotations

from typing import Optional, Any, Dict

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ray.serve.llm import LLMConfig

from deployments.models.embedded import is_embedded_source, resolve_source


class Profile(BaseModel):
    """One deployable model + hardware setting."""

    model_config = ConfigDict(extra="forbid")

    description: str = ""
    llm_config: Dict[str, Any] = Field(description="ray.serve.llm LLMConfig fields")
    router_queues: Dict[str, Any] = Field(
        default_factory=dict,
        description="overrides of the router's `queues` (its user_config) for pools of this profile: how many requests a "
                    "replica takes at once, and how long prompts yield, depend on its hardware",
    )

    router_replicas: Optional[int] = Field(
        None, ge=1,
        description="router replicas an app serving this profile runs (None: one, unless the config's Router entry "
                    "sets them). "
                    "Each streamed chunk costs a router replica about 0.5 ms of one GIL-bound core; on the "
                    "H200, 256 streams went 2.5-3.0k -> 5.1-7.6k tok/s from 1 to 4 (docs/streaming.md)",
    )

    @model_validator(mode="after")
    def _validate_llm_config(self) -> "Profile":
        # Validate now (config load / `serve deploy`), not when a replica starts.
        LLMConfig.model_validate(self.llm_config)
        return self

    @property
    def model_id(self) -> str:
        return self.llm_config["model_loading_config"]["model_id"]

    @property
    def model_source(self) -> str:
        loading = self.llm_config["model_loading_config"]
        return loading.get("model_source") or loading["model_id"]

    @property
    def uses_embedded_model(self) -> bool:
        return is_embedded_source(self.model_source)

    @property
    def max_model_len(self) -> int | None:
        return self.llm_config.get("engine_kwargs", {}).get("max_model_len")

    @property
    def engine_priority(self) -> bool:
        """Does the engine order its queue by request priority?"""
        return self.llm_config.get("engine_kwargs", {}).get("scheduling_policy") == "priority"

    def to_llm_config(self, server_cls: type | str | None = None) -> LLMConfig:
        """Build the LLMConfig to deploy; resolves (and checks) the embedded model."""
        fields = dict(self.llm_config)
        loading = dict(fields["model_loading_config"])
        loading["model_source"] = resolve_source(self.model_source)
        fields["model_loading_config"] = loading
        if server_cls is not None:
            fields.setdefault("server_cls", server_cls)
        if self.max_model_len is None:
            raise ValueError("engine_kwargs.max_model_len must be set: the router admits against it")
        return LLMConfig.model_validate(fields)
