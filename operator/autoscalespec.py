"""``spec.autoscaling`` and ``status.autoscaling``: the operator's built-in autoscaler's API.

With ``spec.autoscaling`` set the operator chooses the engine Deployment's replicas itself
(``autoscale.decide``, fed from the pods' ``/metrics``) and records its choice in
``status.autoscaling``; ``spec.replicas`` is then refused at admission (``spec.CEL_RULES``), so
neither the operator nor an HPA ever writes the field a GitOps tool owns. The targets are
means over the ready pods that answered a scrape; the saturation signal is defined in
``autoscale.saturation`` (docs/operator.md, "Autoscaling"). Cross-field rules are
``CelRule``s, so the CRD and the operator agree.
"""

from __future__ import annotations

from pydantic import ConfigDict, Field, model_validator

from .cel import CelRule, cel_validations, rule_problems
from .kubefields import ApiModel
from .rollout import MAX_PODS

MAX_WINDOW_S = 3600
"""The longest stabilisation window (seconds); it bounds the recommendations kept per object."""
DEFAULT_SATURATION_TARGET = 0.8

TARGET_FIELDS = ("kvCacheUtilization", "waitingRequestsPerReplica", "saturation")
"""The targets' wire names, which ``status.autoscaling.currentSignal`` uses too."""

TARGETS_RULES: tuple[CelRule, ...] = (
    CelRule(
        rule=" || ".join(f"has(self.{name})" for name in TARGET_FIELDS),
        message=f"autoscaling.targets needs at least one of {', '.join(TARGET_FIELDS)}",
        holds=lambda t: any(value is not None for value in t.values().values()),
    ),
)

AUTOSCALING_RULES: tuple[CelRule, ...] = (
    CelRule(
        rule="(has(self.minReplicas) ? self.minReplicas : 1) <= self.maxReplicas",
        message="autoscaling.minReplicas must not exceed autoscaling.maxReplicas",
        holds=lambda a: a.min_replicas <= a.max_replicas,
        detail=lambda a: (
            f"spec.autoscaling.minReplicas ({a.min_replicas}) must not exceed "
            f"spec.autoscaling.maxReplicas ({a.max_replicas})"
        ),
    ),
)


class ScalingTargets(ApiModel):
    """Signal means to hold (over ready pods); the most demanding target decides."""

    model_config = ConfigDict(json_schema_extra=cel_validations(TARGETS_RULES))
    kv_cache_utilization: float | None = Field(
        default=None, gt=0, le=1, description="metroline:kv_cache_usage_perc (0..1)."
    )
    waiting_requests_per_replica: float | None = Field(
        default=None, gt=0, le=65_536, description="metroline:num_requests_waiting."
    )
    saturation: float | None = Field(
        default=None,
        gt=0,
        le=100,
        description="Resource use times queued demand (1 = full, no queue); docs/operator.md.",
    )

    def values(self) -> dict[str, float | None]:
        """Each target by its wire name (``TARGET_FIELDS``), None where unset."""
        return dict(
            zip(
                TARGET_FIELDS,
                (self.kv_cache_utilization, self.waiting_requests_per_replica, self.saturation),
            )
        )

    @model_validator(mode="after")
    def _rules(self) -> ScalingTargets:
        problems = rule_problems(self, TARGETS_RULES)
        if problems:
            raise ValueError("; ".join(problems))
        return self


class Autoscaling(ApiModel):
    """Replicas chosen by the operator from the engine pods' load, within the bounds."""

    model_config = ConfigDict(json_schema_extra=cel_validations(AUTOSCALING_RULES))
    min_replicas: int = Field(default=1, ge=1, le=MAX_PODS, description="Fewest while serving.")
    max_replicas: int = Field(ge=1, le=MAX_PODS, description="Most replicas.")
    targets: ScalingTargets = Field(
        default_factory=lambda: ScalingTargets(saturation=DEFAULT_SATURATION_TARGET),
        json_schema_extra={"default": {"saturation": DEFAULT_SATURATION_TARGET}},
    )
    scale_up_stabilization_seconds: int = Field(
        default=0,
        ge=0,
        le=MAX_WINDOW_S,
        description="Scale up to the lowest recommendation of this window.",
    )
    scale_down_stabilization_seconds: int = Field(
        default=300,
        ge=0,
        le=MAX_WINDOW_S,
        description="Scale down to the highest recommendation of this window.",
    )
    scale_to_zero_after_seconds: int | None = Field(
        default=None,
        ge=1,
        le=86_400,
        description="Unset: never below minReplicas. Else 0 replicas after this long without "
        "a request; the operator's activator wakes it.",
    )

    @property
    def to_zero(self) -> bool:
        """Whether the deployment may scale to zero replicas."""
        return self.scale_to_zero_after_seconds is not None
    activation_timeout_seconds: int = Field(
        default=300,
        ge=1,
        le=3600,
        description="How long the activator holds a request while the deployment wakes.",
    )

    @model_validator(mode="after")
    def _rules(self) -> Autoscaling:
        problems = rule_problems(self, AUTOSCALING_RULES)
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ScalingDecision(ApiModel):
    """The latest change of the replicas the autoscaler asked for."""

    time: str = Field(json_schema_extra={"format": "date-time"})
    from_: int = Field(alias="from", ge=0)
    to: int = Field(ge=0)
    reason: str = Field(max_length=64)
    message: str = Field(default="", max_length=1024)


class AutoscalingStatus(ApiModel):
    """What the autoscaler saw and chose (only with spec.autoscaling)."""

    desired_replicas: int | None = Field(default=None, ge=0)
    current_signal: dict[str, float] | None = Field(
        default=None, description="Means over the measured pods, by target name."
    )
    measured_replicas: int | None = Field(
        default=None, ge=0, description="Ready pods whose /metrics answered."
    )
    last_decision: ScalingDecision | None = None
