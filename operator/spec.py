"""The LLMDeployment API (serving.metroline.dev/v1alpha1) as pydantic models.

These models are the single source of truth: ``crd.py`` generates the CRD's OpenAPI schema from
them, and the operator parses every object with them. Constraints that span fields are written
once as ``CEL_RULES`` and become both CEL ``x-kubernetes-validations`` in the CRD and a pydantic
validator here, so a cluster and the operator agree on what is valid. Fields left unset mean
"the engine's default" and are not passed on its command line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_HF_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
MODEL_URI = (
    rf"^(hf://{_HF_PART}/{_HF_PART}(@[A-Za-z0-9][A-Za-z0-9._/-]*)?"
    r"|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[A-Za-z0-9._@+=/-]*)?"
    r"|/[A-Za-z0-9._@+=/-]*)$"
)
QUANTITY = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"

DEFAULT_MAX_NUM_SEQS = 256
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192
"""The engine's defaults (EngineArgs in engine/config.py; tests/operator/test_engine_cli.py
checks they agree); used by cross-field rules."""


class _Model(BaseModel):
    """camelCase on the wire, unknown fields rejected (like kubectl's strict field validation)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


Quantity = Annotated[
    int | Annotated[str, Field(pattern=QUANTITY)],
    Field(description="A Kubernetes quantity, e.g. 8, 500m, 32Gi."),
]


class SecretKeyRef(_Model):
    """A key of a Secret in the LLMDeployment's namespace."""

    name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253, description="Secret name.")
    key: str = Field(
        default="token", min_length=1, max_length=253, description="Key inside the Secret."
    )


class ModelSource(_Model):
    """Where the weights come from and the name clients ask for."""

    uri: str = Field(
        pattern=MODEL_URI,
        max_length=1024,
        description="hf://org/name[@revision], pvc://claim/path, or an absolute path in the image.",
    )
    served_name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$",
        max_length=256,
        description="Model name in the OpenAI API; defaults to org/name or the last path part.",
    )
    hf_token_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret holding a Hugging Face token (hf:// only)."
    )


class EngineArgs(_Model):
    """Engine settings; each maps to one `metroline serve` flag. Unset means engine default."""

    tensor_parallel_size: Literal[1, 2, 4, 8] = Field(
        default=1, description="GPUs per pod (tensor-parallel degree); pods request this many."
    )
    max_model_len: int | None = Field(
        default=None, ge=16, le=1_048_576, description="Longest prompt plus output, in tokens."
    )
    gpu_memory_utilization: float | None = Field(
        default=None, gt=0, le=1, description="Fraction of GPU memory the engine may use."
    )
    max_num_seqs: int | None = Field(
        default=None, ge=1, le=65_536, description="Most sequences in one step."
    )
    max_num_batched_tokens: int | None = Field(
        default=None, ge=1, le=1_048_576, description="Token budget of one step."
    )
    block_size: Literal[8, 16, 32] | None = Field(
        default=None, description="Tokens per KV-cache block."
    )
    dtype: Literal["auto", "float16", "bfloat16", "float32"] | None = Field(
        default=None, description="Weight and activation dtype."
    )
    enable_prefix_caching: bool = Field(default=True, description="Reuse KV blocks of prefixes.")
    extra_args: list[Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=list, max_length=64, description="More flags, appended verbatim."
    )


class Readiness(_Model):
    """When a pod takes new traffic."""

    kv_cache_threshold: float = Field(
        default=0.95, gt=0, le=1, description="KV-cache use above which /ready answers 503."
    )


class Cache(_Model):
    """A PersistentVolumeClaim that keeps downloaded weights across pod restarts."""

    claim_name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253, description="Existing PVC.")


class ComputeResources(_Model):
    """CPU, memory and ephemeral storage; GPUs come from engine.tensorParallelSize."""

    cpu: Quantity | None = None
    memory: Quantity | None = None
    ephemeral_storage: Quantity | None = Field(default=None, alias="ephemeral-storage")


class Resources(_Model):
    """Requests and limits of the engine container, without nvidia.com/gpu."""

    requests: ComputeResources | None = None
    limits: ComputeResources | None = None


class ObjectKeySelector(_Model):
    """A key of a Secret or ConfigMap."""

    name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253)
    key: str = Field(min_length=1, max_length=253)
    optional: bool | None = None


class FieldSelector(_Model):
    """A field of the pod, e.g. metadata.name or status.podIP."""

    field_path: str = Field(min_length=1, max_length=256)
    api_version: str | None = None


class EnvSource(_Model):
    """Where an environment variable's value comes from."""

    secret_key_ref: ObjectKeySelector | None = None
    config_map_key_ref: ObjectKeySelector | None = None
    field_ref: FieldSelector | None = None


class EnvVar(_Model):
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


class Toleration(_Model):
    """A pod toleration (see the Kubernetes Toleration type)."""

    key: str | None = Field(default=None, max_length=316)
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = Field(default=None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


@dataclass(frozen=True)
class CelRule:
    """One cross-field rule: CEL for the API server, a Python twin for the operator."""

    rule: str
    message: str
    holds: Callable[[LLMDeploymentSpec], bool]


def _batched_tokens_cover_seqs(spec: LLMDeploymentSpec) -> bool:
    engine = spec.engine
    tokens = engine.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS
    return tokens >= (engine.max_num_seqs or DEFAULT_MAX_NUM_SEQS)


CEL_RULES: tuple[CelRule, ...] = (
    CelRule(
        rule="!has(self.model.hfTokenSecretRef) || self.model.uri.startsWith('hf://')",
        message="model.hfTokenSecretRef is only used with hf:// model URIs; remove it",
        holds=lambda s: s.model.hf_token_secret_ref is None or s.model.uri.startswith("hf://"),
    ),
    CelRule(
        rule=(
            "(has(self.engine.maxNumBatchedTokens) ? self.engine.maxNumBatchedTokens : "
            f"{DEFAULT_MAX_NUM_BATCHED_TOKENS}) >= (has(self.engine.maxNumSeqs) ? "
            f"self.engine.maxNumSeqs : {DEFAULT_MAX_NUM_SEQS})"
        ),
        message=(
            "engine.maxNumBatchedTokens must be at least engine.maxNumSeqs "
            f"(defaults {DEFAULT_MAX_NUM_BATCHED_TOKENS} and {DEFAULT_MAX_NUM_SEQS})"
        ),
        holds=_batched_tokens_cover_seqs,
    ),
)


class LLMDeploymentSpec(_Model):
    """The desired state: one model served by `replicas` pods of `tensorParallelSize` GPUs."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [{"rule": r.rule, "message": r.message} for r in CEL_RULES]
        }
    )
    model: ModelSource
    engine: EngineArgs = Field(default_factory=EngineArgs, json_schema_extra={"default": {}})
    replicas: int = Field(default=1, ge=0, le=1024, description="Engine pods (scale subresource).")
    image: str | None = Field(
        default=None, min_length=1, max_length=512, description="Engine image; operator default."
    )
    resources: Resources | None = None
    node_selector: dict[str, str] | None = None
    tolerations: list[Toleration] | None = Field(default=None, max_length=64)
    affinity: dict[str, Any] | None = Field(
        default=None,
        json_schema_extra={"x-metroline-opaque": True},
        description="A Kubernetes Affinity, passed to the pod as is.",
    )
    priority_class_name: str | None = Field(default=None, pattern=DNS_SUBDOMAIN, max_length=253)
    readiness: Readiness = Field(default_factory=Readiness, json_schema_extra={"default": {}})
    startup_timeout_seconds: int = Field(
        default=1800, ge=60, le=86_400,
        description="Startup probe span on /health; the rollout deadline is this plus 600 s.",
    )
    cache: Cache | None = None
    env: list[EnvVar] | None = Field(
        default=None,
        max_length=128,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    pod_labels: dict[str, str] | None = Field(default=None, description="Extra pod labels.")
    pod_annotations: dict[str, str] | None = Field(
        default=None, description="Extra pod annotations."
    )

    @model_validator(mode="after")
    def _cross_field_rules(self) -> LLMDeploymentSpec:
        for cel in CEL_RULES:
            if not cel.holds(self):
                raise ValueError(cel.message)
        return self


ConditionStatus = Literal["True", "False", "Unknown"]
Phase = Literal["Pending", "Progressing", "Ready", "Degraded", "Failed"]


class Condition(_Model):
    """A metav1.Condition: the latest observation of one aspect of the object."""

    type: str = Field(max_length=316)
    status: ConditionStatus
    reason: str = Field(max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = Field(default="", max_length=32_768)
    last_transition_time: str = Field(json_schema_extra={"format": "date-time"})
    observed_generation: int | None = Field(default=None, ge=0)


class LLMDeploymentStatus(_Model):
    """What the cluster says, written only by the operator."""

    observed_generation: int | None = None
    replicas: int | None = None
    ready_replicas: int | None = None
    updated_replicas: int | None = None
    selector: str | None = None
    endpoint: str | None = None
    kv_cache_utilization: float | None = Field(
        default=None, description="Average KV-cache use (0..1) of ready pods, from /metrics."
    )
    phase: Phase | None = None
    conditions: list[Condition] | None = Field(
        default=None,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
