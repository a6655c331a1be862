"""``spec.rollout``: how the engine Deployment replaces its pods (pydantic model and its rules).

Engine pods hold GPUs, and a cluster seldom keeps a spare GPU node, so the default replaces a
pod in place: ``maxSurge: 0, maxUnavailable: 1`` (as LeaderWorkerSet does), never a surge pod
that waits Unschedulable for a GPU. A cluster with spare GPUs may surge instead
(``maxSurge: 1, maxUnavailable: 0``: no serving pod is removed before its successor is ready);
``Recreate`` stops every pod before starting the new ones. The values are Kubernetes'
int-or-percent, validated as the API server validates a Deployment's ``rollingUpdate``
(``ValidateRollingUpdateDeployment``): non-negative, ``maxUnavailable`` at most 100 %, not both
zero, none with ``Recreate``; each rule is a ``CelRule``, so the CRD and the operator agree.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, model_validator

from .cel import CelRule, cel_validations, rule_problems
from .kubefields import ApiModel

MAX_PODS = 1024
"""The most replicas an LLMDeployment may ask for (``spec.replicas``), so the largest useful
absolute surge or unavailability."""
DEFAULT_MAX_SURGE = 0
DEFAULT_MAX_UNAVAILABLE = 1
ZERO = "^0+%?$"
"""RE2 matching an int-or-percent that is zero, as CEL's ``string()`` writes it (0, 0%, 00%)."""

_COUNT = Annotated[int, Field(strict=True, ge=0, le=MAX_PODS)]
MaxSurge = Annotated[
    _COUNT | Annotated[str, Field(pattern=r"^[0-9]{1,3}%$", max_length=4)],
    Field(description=(
        "Pods created above replicas during a rollout: a count or a percentage of replicas "
        f"(rounded up). Default {DEFAULT_MAX_SURGE}: a rollout needs no spare GPU."
    )),
]
MaxUnavailable = Annotated[
    _COUNT | Annotated[str, Field(pattern=r"^(100|[0-9]{1,2})%$", max_length=4)],
    Field(description=(
        "Pods below replicas that may be unready during a rollout: a count or a percentage of "
        f"replicas (rounded down), at most 100%. Default {DEFAULT_MAX_UNAVAILABLE}."
    )),
]


def is_zero(value: int | str) -> bool:
    """The twin of CEL's ``string(value).matches(ZERO)``."""
    return int(str(value).removesuffix("%")) == 0


def _both_zero(rollout: Rollout) -> bool:
    return (rollout.strategy == "RollingUpdate"
            and is_zero(rollout.surge) and is_zero(rollout.unavailable))


def _both_zero_detail(rollout: Rollout) -> str:
    return (
        f"spec.rollout.maxSurge ({rollout.surge}) and spec.rollout.maxUnavailable "
        f"({rollout.unavailable}) are both 0, so the rollout could never replace a pod; raise "
        f"one of them (maxSurge defaults to {DEFAULT_MAX_SURGE}, maxUnavailable to "
        f"{DEFAULT_MAX_UNAVAILABLE})"
    )


def _recreate_detail(rollout: Rollout) -> str:
    given = [name for name, value in (("maxSurge", rollout.max_surge),
                                      ("maxUnavailable", rollout.max_unavailable))
             if value is not None]
    them = "it" if len(given) == 1 else "them"
    return (f"spec.rollout sets {' and '.join(given)}, which only strategy RollingUpdate uses; "
            f"remove {them} or use RollingUpdate")


_RECREATE = "has(self.strategy) && self.strategy == 'Recreate'"

ROLLOUT_RULES: tuple[CelRule, ...] = (
    CelRule(
        rule=(
            f"({_RECREATE}) || !((!has(self.maxSurge) || "
            f"string(self.maxSurge).matches('{ZERO}')) && has(self.maxUnavailable) && "
            f"string(self.maxUnavailable).matches('{ZERO}'))"
        ),
        message=(
            "rollout.maxSurge and rollout.maxUnavailable may not both be 0 (maxSurge defaults "
            f"to {DEFAULT_MAX_SURGE}): the rollout could never replace a pod; raise one of them"
        ),
        holds=lambda r: not _both_zero(r),
        detail=_both_zero_detail,
    ),
    CelRule(
        rule=f"!({_RECREATE}) || (!has(self.maxSurge) && !has(self.maxUnavailable))",
        message=(
            "rollout.maxSurge and rollout.maxUnavailable apply to strategy RollingUpdate only; "
            "remove them or use RollingUpdate"
        ),
        holds=lambda r: r.strategy != "Recreate" or (
            r.max_surge is None and r.max_unavailable is None
        ),
        detail=_recreate_detail,
    ),
)


class Rollout(ApiModel):
    """How a changed pod template replaces the running pods (the Deployment's strategy)."""

    model_config = ConfigDict(json_schema_extra=cel_validations(ROLLOUT_RULES))
    strategy: Literal["RollingUpdate", "Recreate"] = Field(
        default="RollingUpdate",
        description=(
            "RollingUpdate replaces pods a few at a time (maxSurge, maxUnavailable); Recreate "
            "stops every pod before starting new ones (downtime, never two versions at once)."
        ),
    )
    max_surge: MaxSurge | None = None
    max_unavailable: MaxUnavailable | None = None

    @property
    def surge(self) -> int | str:
        return DEFAULT_MAX_SURGE if self.max_surge is None else self.max_surge

    @property
    def unavailable(self) -> int | str:
        return DEFAULT_MAX_UNAVAILABLE if self.max_unavailable is None else self.max_unavailable

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Rollout:
        problems = rule_problems(self, ROLLOUT_RULES)
        if problems:
            raise ValueError("; ".join(problems))
        return self
