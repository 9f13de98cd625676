"""The application's arguments: the ``args`` block of serve_config.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.config.layouts import SINGLE_POOL, Layout, Pool, ResolvedPool
from deployments.config.profiles import Profile
from deployments.router.settings import QueueSettings, RouterSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIG_PATH = REPO_ROOT / "serve_config.yaml"


class RouterOptions(RouterSettings):
    """The router's decision settings plus its Serve deployment options."""

    deployment: Dict[str, Any] = Field(
        default_factory=lambda: {"ray_actor_options": {"num_cpus": 0.5}, "max_ongoing_requests": 1000},
        description="@serve.deployment options for the router",
    )


class AppArgs(BaseModel):
    """Serve one profile (`profile`) or a layout of several pools (`layout`)."""

    model_config = ConfigDict(extra="forbid")

    profile: Optional[str] = Field(None, description="the entry of `profiles` to serve as one pool")
    layout: Optional[str] = Field(None, description="the entry of `layouts` to serve instead")
    profiles: Dict[str, Profile]
    layouts: Dict[str, Layout] = Field(default_factory=dict)
    router: RouterOptions = Field(default_factory=RouterOptions)

    @model_validator(mode="after")
    def _selection_exists(self) -> "AppArgs":
        if (self.profile is None) == (self.layout is None):
            raise ValueError("set exactly one of `profile` and `layout`")
        if self.layout is not None and self.layout not in self.layouts:
            raise ValueError(f"layout {self.layout!r} is not defined; choose one of {sorted(self.layouts)}")
        for where, name in self._profile_references():
            if name not in self.profiles:
                raise ValueError(f"{where}: profile {name!r} is not defined; choose one of {sorted(self.profiles)}")
        for name, profile in self.profiles.items():
            try:
                self.queue_settings(profile)
            except ValueError as exc:
                raise ValueError(f"profile {name!r}: router_queues: {exc}") from None
        for name, layout in self.layouts.items():
            models = {self.profiles[pool.profile].model_id for pool in layout.pools.values()}
            if len(models) > 1:  # the router serves one model name; pools are its replicas
                raise ValueError(f"layout {name!r} mixes models {sorted(models)}; its pools must serve one model")
        return self

    def _profile_references(self):
        if self.profile is not None:
            yield "profile", self.profile
        for name, layout in self.layouts.items():
            for pool_name, pool in layout.pools.items():
                yield f"layout {name!r} pool {pool_name!r}", pool.profile

    @property
    def pools(self) -> List[ResolvedPool]:
        """The pools to deploy, in routing order."""
        if self.profile is not None:
            return [ResolvedPool(SINGLE_POOL, Pool(profile=self.profile), self.profiles[self.profile])]
        return [ResolvedPool(name, pool, self.profiles[pool.profile])
                for name, pool in self.layouts[self.layout].pools.items()]

    def queue_settings(self, profile: Profile) -> QueueSettings:
        """The router's queue settings for pools of this profile: app-wide ones, then the profile's."""
        return QueueSettings.model_validate(_merged(self.router.queues.model_dump(), profile.router_queues))

    @property
    def router_deployment(self) -> Dict[str, Any]:
        """The router's @serve.deployment options: ``router.deployment``, its replica count fixed to the
        largest ``router_replicas`` of the served profiles where one sets it."""
        options = dict(self.router.deployment)
        wanted = [pool.profile.router_replicas for pool in self.pools if pool.profile.router_replicas]
        if wanted:
            n = max(wanted)
            options.pop("num_replicas", None)
            options["autoscaling_config"] = {**options.get("autoscaling_config", {}), "min_replicas": n,
                                             "max_replicas": n, "initial_replicas": n}
        return options

    @property
    def primary(self) -> Profile:
        """The first pool's profile: the served model's name and tokenizer come from it."""
        return self.pools[0].profile


def _merged(base: dict, overrides: dict) -> dict:
    """``overrides`` on top of ``base``, key by key at every depth (a profile may change one class's SLO)."""
    merged = dict(base)
    for key, value in overrides.items():
        both_dicts = isinstance(merged.get(key), dict) and isinstance(value, dict)
        merged[key] = _merged(merged[key], value) if both_dicts else value
    return merged


def load_serve_config(path: Path = SERVE_CONFIG_PATH) -> dict:
    return yaml.safe_load(Path(path).read_text())


def app_args_from_serve_config(path: Path = SERVE_CONFIG_PATH, app_name: str = "llm") -> AppArgs:
    """The validated args of one application in a Serve config file."""
    for app in load_serve_config(path)["applications"]:
        if app["name"] == app_name:
            return AppArgs.model_validate(app.get("args", {}))
    raise KeyError(f"no application named {app_name!r} in {path}")
