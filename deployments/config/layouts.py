"""Layouts: which LLM pools an application runs, and which requests each one takes.

A pool is one LLM deployment: a profile (model + GPU group), the priority
classes it takes, and optionally the Kubernetes node pool its GPU groups must
land on. A layout is an ordered set of pools, for example 4×TP1 on one node
pool for interactive traffic beside 1×TP4 on another for long context. The
router sends each request to the first pool that takes its class and whose
context fits it (deployments/router/pools.py).

Node pools are pinned the same way GPU groups are: every bundle of the pool's
placement group also asks for the custom resource ``node_pool_<name>``, which
only that pool's Ray worker group advertises (k8s/generate.py).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Dict, List, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.config.names import PRIORITY_CLASSES
from deployments.config.profiles import Profile

ClassName = Literal[PRIORITY_CLASSES]  # type: ignore[valid-type]
ALL_CLASSES: tuple[ClassName, ...] = PRIORITY_CLASSES
SINGLE_POOL = "main"  # the pool's name when `args.profile` names one profile
DNS_LABEL = r"[a-z0-9]([a-z0-9-]*[a-z0-9])?"  # pool and node-pool names end up in k8s names and labels


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReplicaBounds(_Strict):
    min_replicas: int = Field(ge=0)
    max_replicas: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "ReplicaBounds":
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class Pool(_Strict):
    profile: str = Field(description="the entry of `profiles` this pool's replicas run")
    classes: List[ClassName] = Field(default_factory=lambda: list(ALL_CLASSES), min_length=1,
                                     description="priority classes routed here first")
    node_pool: Optional[str] = Field(None, pattern=f"^{DNS_LABEL}$",
                                     description="Kubernetes node pool whose Ray worker group hosts it")
    replicas: Optional[ReplicaBounds] = Field(None, description="overrides the profile's autoscaling bounds")
    env_vars: Dict[str, str] = Field(default_factory=dict,
                                     description="added to the profile's runtime_env for this pool only "
                                                 "(e.g. pin a CPU engine to its own core)")


class Layout(_Strict):
    description: str = ""
    pools: Dict[str, Pool] = Field(min_length=1, description="in routing order")

    @model_validator(mode="after")
    def _every_class_has_a_pool(self) -> "Layout":
        served = {cls for pool in self.pools.values() for cls in pool.classes}
        missing = [cls for cls in ALL_CLASSES if cls not in served]
        if missing:
            raise ValueError(f"no pool takes class(es) {missing}; list them in some pool's `classes`")
        for name in self.pools:
            if not re.fullmatch(DNS_LABEL, name):
                raise ValueError(f"pool name {name!r}: use lower-case letters, digits and '-'")
        return self


def node_pool_resource(node_pool: str) -> str:
    """The custom Ray resource a node pool's worker group advertises, one per GPU."""
    return "node_pool_" + node_pool.replace("-", "_")


@dataclass(frozen=True)
class ResolvedPool:
    """A pool with its profile looked up: everything needed to deploy and route it."""

    name: str
    pool: Pool
    profile: Profile

    @property
    def classes(self) -> List[str]:
        return list(self.pool.classes)

    def llm_config_fields(self) -> dict:
        """The profile's LLMConfig fields with this pool's node pool and replica bounds applied."""
        fields = copy.deepcopy(self.profile.llm_config)
        if self.pool.node_pool:
            resource = node_pool_resource(self.pool.node_pool)
            placement = fields.setdefault("placement_group_config", {})
            bundles = placement.get("bundles") or [{}]
            placement["bundles"] = [{**bundle, resource: 1} for bundle in bundles]
        if self.pool.env_vars:
            runtime_env = fields.setdefault("runtime_env", {})
            runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **self.pool.env_vars}
        if self.pool.replicas:
            deployment = fields.setdefault("deployment_config", {})
            deployment.pop("num_replicas", None)
            deployment["autoscaling_config"] = {**deployment.get("autoscaling_config", {}),
                                                **self.pool.replicas.model_dump()}
        return fields

    def as_profile(self) -> Profile:
        return Profile(description=self.profile.description, llm_config=self.llm_config_fields())
