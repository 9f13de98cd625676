"""The application's arguments: the ``args`` block of serve_config.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.config.profiles import Profile
from deployments.router.settings import RouterSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIG_PATH = REPO_ROOT / "serve_config.yaml"


class RouterOptions(RouterSettings):
    """The router's decision settings plus its Serve deployment options."""

    deployment: Dict[str, Any] = Field(
        default_factory=lambda: {"ray_actor_options": {"num_cpus": 0.5}, "max_ongoing_requests": 1000},
        description="@serve.deployment options for the router",
    )


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    profile: str = Field(description="name of the entry in `profiles` to serve")
    profiles: Dict[str, Profile]
    router: RouterOptions = Field(default_factory=RouterOptions)

    @model_validator(mode="after")
    def _profile_exists(self) -> "AppArgs":
        if self.profile not in self.profiles:
            raise ValueError(
                f"profile {self.profile!r} is not defined; choose one of {sorted(self.profiles)}"
            )
        return self

    @property
    def selected(self) -> Profile:
        return self.profiles[self.profile]


def load_serve_config(path: Path = SERVE_CONFIG_PATH) -> dict:
    return yaml.safe_load(Path(path).read_text())


def app_args_from_serve_config(path: Path = SERVE_CONFIG_PATH, app_name: str = "llm") -> AppArgs:
    """The validated args of one application in a Serve config file."""
    for app in load_serve_config(path)["applications"]:
        if app["name"] == app_name:
            return AppArgs.model_validate(app.get("args", {}))
    raise KeyError(f"no application named {app_name!r} in {path}")
