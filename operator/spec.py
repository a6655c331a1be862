"""The LLMDeployment API (serving.metroline.dev/v1alpha1) as pydantic models: spec and status.

These models are the single source of truth: ``crd.py`` generates the CRD's OpenAPI schema from
them, and the operator parses every object with them. Constraints that span fields are written
once as ``CelRule``s (``cel.py``; ``CEL_RULES`` on the spec, ``kubefields.RESOURCE_RULES`` on
``resources``, ``OBJECT_RULES`` on the whole object, ``ROLLOUT_RULES``, ``ROUTING_RULES`` and
``AUTOSCALING_RULES`` in ``rollout.py``, ``routing.py``, ``autoscalespec.py``) and become both
CEL ``x-kubernetes-validations`` and a Python twin, so a cluster and the operator agree on what
is valid. Fields left unset mean "the engine's default" and are not passed on its command line.

Admission is bounded: quantity strings have a maximum length and a pattern with a two-digit
exponent (``kubefields.Quantity``, ``quantity.py``), and CEL rules call Kubernetes'
``quantity()`` only on strings without a longer exponent (``cel.cel_if_safe``). ``affinity``,
``tolerations`` and ``nodeSelector`` have the Kubernetes types' schemas (``schema.K8S_SCHEMA``),
taken from the OpenAPI that kubernetes-validate ships for ``K8S_SCHEMA_VERSION``.

Other modules and tests import the names of ``cel.py``, ``kubefields.py`` and
``managedflags.py`` from here too (re-exported below).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, model_validator

from . import constants as c
from . import quantity as q
from .autoscalespec import Autoscaling, AutoscalingStatus
from .cel import CelRule, cel_if_safe, cel_name, cel_quantity, cel_validations, rule_problems
from .kubefields import (
    DNS_1035_LABEL,
    DNS_LABEL,
    DNS_SUBDOMAIN,
    ENV_NAME,
    QUANTITY,
    RESOURCE_RULES,
    ApiModel,
    ComputeResources,
    EnvSource,
    EnvVar,
    FieldSelector,
    ObjectKeySelector,
    Quantity,
    Resources,
    SecretKeyRef,
    Toleration,
)
from .managedflags import (
    MANAGED_FLAGS,
    managed_flag,
    managed_flag_regex,
    managed_flags_detail,
    managed_flags_set,
)
from .rollout import ROLLOUT_RULES, Rollout
from .routing import Routing
from .schema import K8S_SCHEMA

__all__ = [
    "CEL_RULES", "DEFAULT_MAX_NUM_BATCHED_TOKENS", "DEFAULT_MAX_NUM_SEQS", "DNS_1035_LABEL",
    "DNS_LABEL", "DNS_SUBDOMAIN", "ENV_NAME", "K8S_SCHEMA_VERSION", "MANAGED_FLAGS",
    "MODEL_URI", "OBJECT_RULES", "QUANTITY", "RESOURCE_RULES", "ROLLOUT_RULES",
    "SHM_GIB_PER_GPU", "Cache", "CelRule", "ComputeResources", "Condition", "EngineArgs",
    "EnvSource", "EnvVar", "FieldSelector", "LLMDeploymentSpec", "LLMDeploymentStatus",
    "ModelSource", "ObjectKeySelector", "Quantity", "Readiness", "Resources", "Rollout",
    "SecretKeyRef", "Toleration", "cel_if_safe", "cel_name", "cel_quantity", "managed_flag",
    "managed_flag_regex", "shm_bytes",
]

_HF_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
MODEL_URI = (
    rf"^(hf://{_HF_PART}/{_HF_PART}(@[A-Za-z0-9][A-Za-z0-9._/-]*)?"
    r"|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[A-Za-z0-9._@+=/-]*)?"
    r"|/[A-Za-z0-9._@+=/-]*)$"
)

K8S_SCHEMA_VERSION = "1.30"
"""The Kubernetes version whose OpenAPI types ``affinity``, ``tolerations`` and ``nodeSelector``:
the oldest the CRD supports, so the CRD admits no field an older API server would not know."""
SHM_GIB_PER_GPU = 2
"""``/dev/shm`` is a memory-backed emptyDir of this many GiB per GPU (``pod.volumes``)."""

DEFAULT_MAX_NUM_SEQS = 1024
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192
"""The engine's defaults (EngineArgs in engine/config.py; tests/operator/test_engine_cli.py
checks they agree); used by cross-field rules."""


class ModelSource(ApiModel):
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


class EngineArgs(ApiModel):
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


class Readiness(ApiModel):
    """When a pod takes new traffic."""

    kv_cache_threshold: float = Field(
        default=0.95, gt=0, le=1, description="KV-cache use above which /ready answers 503."
    )


class Cache(ApiModel):
    """A PersistentVolumeClaim that keeps downloaded weights across pod restarts."""

    claim_name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253, description="Existing PVC.")


def shm_bytes(tensor_parallel_size: int) -> int:
    return SHM_GIB_PER_GPU * tensor_parallel_size * 2**30


def _shm_fits(spec: LLMDeploymentSpec) -> bool:
    limits = spec.resources.limits if spec.resources else None
    if limits is None or limits.memory is None:
        return True
    return q.parse_quantity(limits.memory) >= shm_bytes(spec.engine.tensor_parallel_size)


def _shm_detail(spec: LLMDeploymentSpec) -> str:
    assert spec.resources is not None and spec.resources.limits is not None
    tp = spec.engine.tensor_parallel_size
    return (
        f"spec.resources.limits.memory ({spec.resources.limits.memory}) is below the "
        f"{SHM_GIB_PER_GPU * tp}Gi /dev/shm of {tp} GPU(s) ({SHM_GIB_PER_GPU}Gi per GPU), which "
        "counts against the pod's memory; raise the limit"
    )


def _reserved_env(spec: LLMDeploymentSpec) -> list[str]:
    return [var.name for var in spec.env or () if var.name in c.RESERVED_ENV]


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
    CelRule(
        rule="!self.model.uri.matches('(^|/)[.][.](/|$)')",
        message="model.uri must not contain '..' path segments",
        holds=lambda s: ".." not in s.model.uri.split("/"),
        detail=lambda s: f"spec.model.uri {s.model.uri!r} must not contain '..' path segments",
    ),
    CelRule(
        rule=(
            "!has(self.engine.extraArgs) || "
            f"!self.engine.extraArgs.exists(a, a.matches('{managed_flag_regex()}'))"
        ),
        message=(
            "engine.extraArgs sets a flag (or a prefix of one) that the operator renders from "
            f"the spec or refuses ({', '.join(sorted(MANAGED_FLAGS))}); use the matching spec "
            "field (a revision goes in model.uri, hf://org/name@revision; a --config file's "
            "flags in engine.extraArgs)"
        ),
        holds=lambda s: not managed_flags_set(s.engine.extra_args),
        detail=lambda s: managed_flags_detail(s.engine.extra_args),
    ),
    CelRule(
        rule=(
            "!has(self.env) || !self.env.exists(e, e.name in "
            f"[{', '.join(repr(n) for n in sorted(c.RESERVED_ENV))}])"
        ),
        message=(
            f"env may not set {', '.join(sorted(c.RESERVED_ENV))}: the operator, the GPU device "
            "plugin or the container runtime sets them"
        ),
        holds=lambda s: not _reserved_env(s),
        detail=lambda s: "; ".join(
            f"spec.env sets {name}, which the operator, the GPU device plugin or the container "
            "runtime manages; remove it" for name in _reserved_env(s)
        ),
    ),
    CelRule(
        rule=(
            "!has(self.resources) || !has(self.resources.limits) || "
            "!has(self.resources.limits.memory) || "
            + cel_if_safe(
                ("self.resources.limits.memory",),
                f"{cel_quantity('self.resources.limits.memory')}.compareTo(quantity(string("
                "(has(self.engine.tensorParallelSize) ? self.engine.tensorParallelSize : 1) * "
                f"{SHM_GIB_PER_GPU * 2**30}))) >= 0",
            )
        ),
        message=(
            f"resources.limits.memory must be at least the /dev/shm size, {SHM_GIB_PER_GPU}Gi "
            "per GPU (engine.tensorParallelSize), which counts against the pod's memory"
        ),
        holds=_shm_fits,
        detail=_shm_detail,
    ),
    CelRule(
        rule="!has(self.autoscaling) || !has(self.replicas)",
        message=(
            "spec.replicas and spec.autoscaling are mutually exclusive: with autoscaling the "
            "operator chooses the replicas (status.autoscaling.desiredReplicas); remove "
            "spec.replicas (kubectl scale writes it, so it is refused too)"
        ),
        holds=lambda s: s.autoscaling is None or s.replicas is None,
    ),
    CelRule(
        rule=(
            "!has(self.autoscaling) || !has(self.autoscaling.scaleToZeroAfterSeconds) || "
            "!has(self.routing) || !has(self.routing.inferencePool) || !self.routing.inferencePool"
        ),
        message=(
            "autoscaling.scaleToZeroAfterSeconds cannot be used with routing.inferencePool: at "
            "zero replicas the pool is empty, so requests routed by the endpoint picker never "
            "reach the activator that wakes the deployment; drop one of them"
        ),
        holds=lambda s: not (s.routing.inference_pool and s.autoscaling and s.autoscaling.to_zero),
    ),
)

OBJECT_RULES: tuple[CelRule, ...] = (
    CelRule(
        rule=(
            f"self.metadata.name.matches('{DNS_1035_LABEL}') && "
            "size(self.metadata.name) <= 63"
        ),
        message=(
            "metadata.name must be a DNS-1035 label (a lowercase letter first, then lowercase "
            "letters, digits or '-', at most 63 characters) because it names the Service"
        ),
        holds=lambda name: bool(re.fullmatch(DNS_1035_LABEL, name)) and len(name) <= 63,
    ),
)
"""Rules on the whole object, whose ``self`` is the LLMDeployment (the twin gets the name)."""


class LLMDeploymentSpec(ApiModel):
    """The desired state: one model served by `replicas` pods of `tensorParallelSize` GPUs."""

    model_config = ConfigDict(json_schema_extra=cel_validations(CEL_RULES))
    model: ModelSource
    engine: EngineArgs = Field(default_factory=EngineArgs, json_schema_extra={"default": {}})
    replicas: int | None = Field(
        default=None, ge=0, le=1024,
        description="Engine pods (scale subresource); 1 when unset. Not with autoscaling.",
    )
    autoscaling: Autoscaling | None = Field(
        default=None, description="The operator sets the replicas from load (docs: Autoscaling)."
    )
    image: str | None = Field(
        default=None, min_length=1, max_length=512, description="Engine image; operator default."
    )
    resources: Resources | None = None
    node_selector: dict[str, str] | None = Field(
        default=None,
        json_schema_extra={K8S_SCHEMA: "io.k8s.api.core.v1.PodSpec/nodeSelector"},
        description="Node labels the pods require (a Kubernetes nodeSelector).",
    )
    tolerations: list[Toleration] | None = Field(
        default=None,
        max_length=64,
        json_schema_extra={K8S_SCHEMA: "io.k8s.api.core.v1.PodSpec/tolerations"},
        description="Kubernetes Tolerations, added to the one for nvidia.com/gpu taints.",
    )
    affinity: dict[str, Any] | None = Field(
        default=None,
        json_schema_extra={K8S_SCHEMA: "io.k8s.api.core.v1.PodSpec/affinity"},
        description=(
            "A Kubernetes Affinity, passed to the pod as is; the CRD checks it against the "
            "Kubernetes type, the operator leaves it to the API server."
        ),
    )
    priority_class_name: str | None = Field(default=None, pattern=DNS_SUBDOMAIN, max_length=253)
    readiness: Readiness = Field(default_factory=Readiness, json_schema_extra={"default": {}})
    rollout: Rollout = Field(
        default_factory=Rollout, json_schema_extra={"default": {}},
        description="How pods are replaced; by default one at a time, without a spare GPU.",
    )
    routing: Routing = Field(default_factory=Routing, json_schema_extra={"default": {}},
                             description="Routing through an InferencePool (docs: Routing).")
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

    @property
    def fixed_replicas(self) -> int:
        """``spec.replicas``, 1 when unset (with ``autoscaling`` the operator decides)."""
        return 1 if self.replicas is None else self.replicas

    @model_validator(mode="after")
    def _cross_field_rules(self) -> LLMDeploymentSpec:
        problems = rule_problems(self, CEL_RULES)
        if problems:
            raise ValueError("; ".join(problems))
        return self


ConditionStatus = Literal["True", "False", "Unknown"]
Phase = Literal["Pending", "Progressing", "Ready", "Degraded", "Failed"]


class Condition(ApiModel):
    """A metav1.Condition: the latest observation of one aspect of the object."""

    type: str = Field(max_length=316)
    status: ConditionStatus
    reason: str = Field(max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = Field(default="", max_length=32_768)
    last_transition_time: str = Field(json_schema_extra={"format": "date-time"})
    observed_generation: int | None = Field(default=None, ge=0)


class LLMDeploymentStatus(ApiModel):
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
    autoscaling: AutoscalingStatus | None = None
    phase: Phase | None = None
    conditions: list[Condition] | None = Field(
        default=None,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
