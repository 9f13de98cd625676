"""The application as serve_config.yaml describes it: its ``args`` and its router's settings.

``args`` (``AppArgs``) says what to serve: the profiles, the layouts, which one
is selected. Serve hashes ``args`` into every deployment's code version, so any
edit there replaces every replica, vLLM engines included. The router's
settings are therefore not in ``args``: they are the Router deployment's
``user_config`` under the application's ``deployments``, which Serve applies to
running router replicas (``Router.reconfigure``) without a restart; that entry
also holds the router's deployment options. ``ServedApp`` reads both, for the
tools that need the whole picture (k8s/generate.py, the capacity planner, tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.config.layouts import SINGLE_POOL, Layout, Pool, ResolvedPool
from deployments.config.profiles import Profile
from deployments.config.names import ROUTER_DEPLOYMENT
from deployments.router.settings import QueueSettings, RouterSettings, queue_settings_for

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIG_PATH = REPO_ROOT / "serve_config.yaml"


# The router's deployment options in code; the Router entry of the config's `deployments` overrides them.
# max_ongoing_requests is high so that requests reach the router's own bounded queues instead of waiting,
# unbounded, in Serve in front of it (Serve's default is 5).
ROUTER_OPTIONS = {"ray_actor_options": {"num_cpus": 0.5}, "max_ongoing_requests": 1000}


class AppArgs(BaseModel):
    """Serve one profile (`profile`) or a layout of several pools (`layout`)."""

    model_config = ConfigDict(extra="forbid")

    profile: Optional[str] = Field(None, description="the entry of `profiles` to serve as one pool")
    layout: Optional[str] = Field(None, description="the entry of `layouts` to serve instead")
    profiles: Dict[str, Profile]
    layouts: Dict[str, Layout] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _no_router_settings(cls, data: Any) -> Any:
        if isinstance(data, dict) and "router" in data:
            raise ValueError("`args.router` moved: the router's settings are the `user_config` of the Router "
                             "entry under the application's `deployments` (serve_config.yaml), so that "
                             "editing them does not restart the LLM engines")
        return data

    @model_validator(mode="after")
    def _selection_exists(self) -> "AppArgs":
        if (self.profile is None) == (self.layout is None):
            raise ValueError("set exactly one of `profile` and `layout`")
        if self.layout is not None and self.layout not in self.layouts:
            raise ValueError(f"layout {self.layout!r} is not defined; choose one of {sorted(self.layouts)}")
        for where, name in self._profile_references():
            if name not in self.profiles:
                raise ValueError(f"{where}: profile {name!r} is not defined; choose one of {sorted(self.profiles)}")
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

    @property
    def router_replicas(self) -> int:
        """The router's replica count: the largest ``router_replicas`` of the served profiles, else 1."""
        return max([pool.profile.router_replicas or 1 for pool in self.pools])

    @property
    def router_deployment(self) -> Dict[str, Any]:
        """The router's @serve.deployment options in code: ``ROUTER_OPTIONS``, its replica count fixed
        (listed, so the app's autoscaling policy can read the router's queues)."""
        n = self.router_replicas
        return {**ROUTER_OPTIONS, "autoscaling_config": {"min_replicas": n, "max_replicas": n, "initial_replicas": n}}

    @property
    def primary(self) -> Profile:
        """The first pool's profile: the served model's name and tokenizer come from it."""
        return self.pools[0].profile


class ServedApp(BaseModel):
    """One application of a Serve config as the project reads it offline: ``args`` and the Router
    deployment's entry (its options and, as ``user_config``, its settings)."""

    model_config = ConfigDict(extra="forbid")

    args: AppArgs
    router: RouterSettings = Field(default_factory=RouterSettings)
    router_options: Dict[str, Any] = Field(default_factory=dict, description="the Router entry of `deployments`, "
                                                                               "less user_config")

    @model_validator(mode="after")
    def _every_profile_queues(self) -> "ServedApp":
        for name, profile in self.args.profiles.items():
            try:
                self.queue_settings(profile)
            except ValueError as exc:
                raise ValueError(f"profile {name!r}: router_queues: {exc}") from None
        return self

    @classmethod
    def from_config_app(cls, app: dict) -> "ServedApp":
        """From one entry of a Serve config's ``applications``."""
        entry = next((dict(d) for d in app.get("deployments") or [] if d.get("name") == ROUTER_DEPLOYMENT), {})
        entry.pop("name", None)
        settings = entry.pop("user_config", None) or {}
        return cls(args=app.get("args", {}), router=settings, router_options=entry)

    def queue_settings(self, profile: Profile) -> QueueSettings:
        """The router's queue settings for pools of this profile: app-wide ones, then the profile's."""
        return queue_settings_for(self.router.queues, profile.router_queues)

    @property
    def router_deployment(self) -> Dict[str, Any]:
        """The router's deployment options as Serve applies them: code's, then the config's entry."""
        return {**self.args.router_deployment, **self.router_options}


def load_serve_config(path: Path = SERVE_CONFIG_PATH) -> dict:
    return yaml.safe_load(Path(path).read_text())


def router_entry(app: dict) -> dict:
    """The Router entry under ``deployments`` of one application of a Serve config (a dict, edited in
    place: added when missing, with a ``user_config``). For tools that write configs."""
    deployments = app.setdefault("deployments", [])
    entry = next((d for d in deployments if d.get("name") == ROUTER_DEPLOYMENT), None)
    if entry is None:
        entry = {"name": ROUTER_DEPLOYMENT}
        deployments.append(entry)
    entry.setdefault("user_config", {})
    return entry


def served_app_from_serve_config(path: Path = SERVE_CONFIG_PATH, app_name: str = "llm") -> ServedApp:
    """One application of a Serve config file, validated: its args and its router's settings."""
    for app in load_serve_config(path)["applications"]:
        if app["name"] == app_name:
            return ServedApp.from_config_app(app)
    raise KeyError(f"no application named {app_name!r} in {path}")


def app_args_from_serve_config(path: Path = SERVE_CONFIG_PATH, app_name: str = "llm") -> AppArgs:
    """The validated args of one application in a Serve config file."""
    return served_app_from_serve_config(path, app_name).args


def main(argv: list[str] | None = None) -> int:
    """``python -m deployments.config.app_args [serve_config.yaml]``: validate every application of a Serve
    config as the app and its router would (args, router settings, every profile's queue overrides), before
    ``serve deploy``. A router replica that is already running keeps its settings when handed invalid ones,
    so this check is where a bad edit should stop. Exit status 0 when valid, 1 with the reasons when not."""
    import sys

    path = Path(argv[0] if argv else (sys.argv[1] if len(sys.argv) > 1 else SERVE_CONFIG_PATH))
    failures = []
    for app in load_serve_config(path)["applications"]:
        try:
            ServedApp.from_config_app(app)
        except ValueError as exc:  # pydantic.ValidationError is a ValueError
            failures.append(f"application {app.get('name')!r}: {exc}")
    print("\n".join(failures) or f"{path}: valid", file=sys.stderr if failures else sys.stdout)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
