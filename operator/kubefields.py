"""Fields of the LLMDeployment that carry Kubernetes types: quantities, container resources,
environment variables, tolerations and Secret references (pydantic models).

Each mirrors the Kubernetes type of the same name within the bounds that keep admission cheap:
quantity strings have a maximum length and a pattern with a two-digit exponent (see
``quantity.py``), and the rule that requests stay within limits (``RESOURCE_RULES``) is a
``CelRule``, so the API server and the operator judge it alike.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from . import quantity as q
from .cel import CelRule, cel_if_safe, cel_name, cel_quantity, cel_validations, rule_problems

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS_1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
QUANTITY = q.PATTERN


class ApiModel(BaseModel):
    """camelCase on the wire, unknown fields rejected (like kubectl's strict field validation)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


def _bounded_quantity(value: str) -> str:
    q.parse_quantity(value)  # ValueError above 2^63-1; the pattern already checked the rest
    return value


Quantity = Annotated[
    Annotated[int, Field(ge=0, le=q.MAX_VALUE)]
    | Annotated[
        str, Field(pattern=QUANTITY, max_length=q.MAX_LENGTH), AfterValidator(_bounded_quantity)
    ],
    Field(
        description=(
            "A Kubernetes quantity, e.g. 8, 500m, 32Gi, 1.5, 1e3: at most 28 digits before "
            "the point and 9 after it, a two-digit exponent, no sign, at most 2^63-1."
        ),
        json_schema_extra={"x-kubernetes-validations": [{
            "rule": (
                f"type(self) == string && !self.matches('{q.UNSAFE_EXPONENT}') ? "
                f"quantity(self).compareTo(quantity('{q.MAX_VALUE}')) <= 0 : true"
            ),
            "message": f"a quantity may be at most 2^63-1 ({q.MAX_VALUE})",
        }]},
    ),
]


class SecretKeyRef(ApiModel):
    """A key of a Secret in the LLMDeployment's namespace."""

    name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253, description="Secret name.")
    key: str = Field(
        default="token", min_length=1, max_length=253, description="Key inside the Secret."
    )


class ComputeResources(ApiModel):
    """CPU, memory and ephemeral storage; GPUs come from engine.tensorParallelSize."""

    cpu: Quantity | None = None
    memory: Quantity | None = None
    ephemeral_storage: Quantity | None = Field(default=None, alias="ephemeral-storage")


def _request_within_limit(resource: str) -> CelRule:
    field = resource.replace("-", "_")
    request, limit = f"self.requests.{cel_name(resource)}", f"self.limits.{cel_name(resource)}"

    def pair(res: Resources) -> tuple[Any, Any]:
        requests, limits = res.requests, res.limits
        return (getattr(requests, field, None) if requests else None,
                getattr(limits, field, None) if limits else None)

    def holds(res: Resources) -> bool:
        wanted, cap = pair(res)
        return wanted is None or cap is None or q.parse_quantity(wanted) <= q.parse_quantity(cap)

    def detail(res: Resources) -> str:
        wanted, cap = pair(res)
        return (f"spec.resources.requests.{resource} ({wanted}) exceeds "
                f"spec.resources.limits.{resource} ({cap}); lower the request or raise the limit")

    return CelRule(
        rule=(
            f"!has(self.requests) || !has(self.limits) || !has({request}) || !has({limit}) || "
            + cel_if_safe((request, limit),
                          f"{cel_quantity(request)}.compareTo({cel_quantity(limit)}) <= 0")
        ),
        message=f"requests.{resource} exceeds limits.{resource}; lower the request or raise "
                "the limit",
        holds=holds,
        detail=detail,
    )


RESOURCE_RULES: tuple[CelRule, ...] = tuple(
    _request_within_limit(r) for r in ("cpu", "memory", "ephemeral-storage")
)


class Resources(ApiModel):
    """Requests and limits of the engine container, without nvidia.com/gpu."""

    model_config = ConfigDict(json_schema_extra=cel_validations(RESOURCE_RULES))
    requests: ComputeResources | None = None
    limits: ComputeResources | None = None

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Resources:
        problems = rule_problems(self, RESOURCE_RULES)
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ObjectKeySelector(ApiModel):
    """A key of a Secret or ConfigMap."""

    name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253)
    key: str = Field(min_length=1, max_length=253)
    optional: bool | None = None


class FieldSelector(ApiModel):
    """A field of the pod, e.g. metadata.name or status.podIP."""

    field_path: str = Field(min_length=1, max_length=256)
    api_version: str | None = None


class EnvSource(ApiModel):
    """Where an environment variable's value comes from."""

    secret_key_ref: ObjectKeySelector | None = None
    config_map_key_ref: ObjectKeySelector | None = None
    field_ref: FieldSelector | None = None


class EnvVar(ApiModel):
    """An environment variable of the engine container."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "!(has(self.value) && has(self.valueFrom))",
                 "message": "set either value or valueFrom, not both"}
            ]
        }
    )
    name: str = Field(pattern=ENV_NAME, max_length=256)
    value: str | None = None
    value_from: EnvSource | None = None

    @model_validator(mode="after")
    def _value_or_value_from(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError(f"env {self.name}: set either value or valueFrom, not both")
        return self


class Toleration(ApiModel):
    """A pod toleration (see the Kubernetes Toleration type)."""

    key: str | None = Field(default=None, max_length=316)
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = Field(default=None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None
