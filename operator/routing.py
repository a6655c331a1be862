"""``spec.routing``: load- and prefix-aware routing through the Gateway API Inference Extension.

With ``routing.inferencePool: true`` the operator owns one ``InferencePool``
(``inference.networking.k8s.io/v1``) named after the LLMDeployment: it selects exactly the
engine pods (the selector labels plus ``app.kubernetes.io/component: engine``, which the pod
template carries and no other pod of the LLMDeployment does), on the engine's HTTP port, and
names the endpoint picker (the extension's EPP) that the user runs, by its Service
(``routing.endpointPicker``). The operator does not deploy the picker: its image, flags and
plugin configuration follow the extension's release, which the user (or the Gateway provider)
chooses; docs/operator.md ("Routing") gives the flags that point it at the engine's metrics
(``PICKER_METRIC_FLAGS``).

The pool is a child like the others (owner reference, server-side apply, drift-corrected,
deleted when ``inferencePool`` turns false). It is optional to the serving path: the engines
serve through the Service whatever happens to it. A cluster without the extension's CRD answers
its apply with 404; ``InferencePools`` records that, the status condition ``InferencePool``
says so, and the pool is tried again after ``POOL_RECHECK_S`` (never in a tight loop), while
Ready, Progressing and Degraded keep describing the pods.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field, model_validator

from . import constants as c
from .cel import CelRule, cel_validations, rule_problems
from .kubefields import DNS_1035_LABEL, ApiModel

if TYPE_CHECKING:
    from .cache import Key
    from .checks import SpecCheck
    from .kube import ApiError
    from .workqueue import WorkQueue

logger = logging.getLogger(__name__)

POOL_GROUP = "inference.networking.k8s.io"
POOL_API_VERSION = f"{POOL_GROUP}/v1"
POOL_KIND = "InferencePool"
POOL_PLURAL = "inferencepools"
DEFAULT_PICKER_PORT = 9002
"""The endpoint picker's gRPC (Envoy ext_proc) port: its ``--grpc-port`` default."""
POOL_RECHECK_S = 60.0
"""How long after a 404 (no InferencePool CRD) the operator tries the pool again."""
CONDITION = "InferencePool"
"""The status condition that reports on the pool (only while ``inferencePool`` is true)."""
CRD_NOT_INSTALLED = "CRDNotInstalled"

PICKER_METRIC_FLAGS: dict[str, str] = {
    "--total-queued-requests-metric": "metroline:num_requests_waiting",
    "--total-running-requests-metric": "metroline:num_requests_running",
    "--kv-cache-usage-percentage-metric": c.KV_METRIC,
    "--lora-info-metric": "",
    "--cache-info-metric": "metroline:cache_config_info",
}
"""The endpoint picker's flags that name the engine's Prometheus metrics (its defaults are
vLLM's ``vllm:*`` names). The engine serves no LoRA adapters: an empty LoRA metric turns the
picker's LoRA affinity off. The engine exports each of these on ``/metrics``
(tests/operator/test_routing.py checks it against the engine's own metrics)."""


class EndpointPicker(ApiModel):
    """The endpoint picker that chooses a pod per request: a Service the user runs."""

    name: str = Field(
        pattern=DNS_1035_LABEL,
        max_length=63,
        description="The picker's Service, in the LLMDeployment's namespace.",
    )
    port: int = Field(
        default=DEFAULT_PICKER_PORT,
        ge=1,
        le=65535,
        description="The Service's port of the picker's gRPC (ext_proc) endpoint.",
    )
    failure_mode: Literal["FailClose", "FailOpen"] = Field(
        default="FailClose",
        description=(
            "What the Gateway does while the picker does not answer: FailClose refuses the "
            "request, FailOpen sends it to a pod of the pool."
        ),
    )


ROUTING_RULES: tuple[CelRule, ...] = (
    CelRule(
        rule="!(has(self.inferencePool) && self.inferencePool) || has(self.endpointPicker)",
        message=(
            "routing.endpointPicker is required with routing.inferencePool: true (the "
            "InferencePool names the picker's Service)"
        ),
        holds=lambda r: not r.inference_pool or r.endpoint_picker is not None,
    ),
    CelRule(
        rule="(has(self.inferencePool) && self.inferencePool) || !has(self.endpointPicker)",
        message=(
            "routing.endpointPicker is used only with routing.inferencePool: true; set "
            "inferencePool: true or remove endpointPicker"
        ),
        holds=lambda r: r.inference_pool or r.endpoint_picker is None,
    ),
)


class Routing(ApiModel):
    """How requests reach the engine pods besides the Service."""

    model_config = ConfigDict(json_schema_extra=cel_validations(ROUTING_RULES))
    inference_pool: bool = Field(
        default=False,
        description=(
            "Create an InferencePool (inference.networking.k8s.io/v1) of the engine pods, for "
            "a Gateway whose endpoint picker routes each request by queue, KV use and prefix."
        ),
    )
    endpoint_picker: EndpointPicker | None = None

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Routing:
        problems = rule_problems(self, ROUTING_RULES)
        if problems:
            raise ValueError("; ".join(problems))
        return self


def wants_pool(check: SpecCheck) -> bool:
    return check.spec is not None and check.spec.routing.inference_pool


def render_inference_pool(
    metadata: Mapping[str, Any], pod_selector: Mapping[str, str], picker: EndpointPicker
) -> dict[str, Any]:
    """The InferencePool: the pods that ``pod_selector`` matches, on the engine's HTTP/1.1
    port, picked by the ``picker`` Service. ``metadata`` is the child metadata every child has."""
    return {
        "apiVersion": POOL_API_VERSION,
        "kind": POOL_KIND,
        "metadata": dict(metadata),
        "spec": {
            "selector": {"matchLabels": dict(pod_selector)},
            "targetPorts": [{"number": c.HTTP_PORT}],
            "endpointPickerRef": {
                "kind": "Service",
                "name": picker.name,
                "port": {"number": picker.port},
                "failureMode": picker.failure_mode,
            },
        },
    }


State = tuple[str, str, str]
"""A condition's (status, reason, message)."""


class InferencePools:
    """What the operator knows of InferencePools beyond the cache: which LLMDeployments found
    the API server without the kind (a 404 on apply: the extension's CRD is not installed),
    since when, in the server's words.

    Invariants: a key is marked missing only by a 404 on its pool's apply, and unmarked when its
    pool is seen (or no longer wanted); while marked, its pool is not applied again for half of
    ``recheck_s``, and a reconcile is queued ``recheck_s`` after each 404. ``unwatched`` turns
    true when a pool appears after its CRD was missing: kopf resolves the kinds it watches once,
    at start (resource scanning is off), so this operator does not watch InferencePools."""

    def __init__(
        self, monotonic: Callable[[], float] = time.monotonic, recheck_s: float = POOL_RECHECK_S
    ) -> None:
        self.monotonic, self.recheck_s = monotonic, recheck_s
        self._missing: dict[Key, tuple[float, str]] = {}
        self.unwatched = False

    def to_apply(self, key: Key, children: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """``children`` without the pool while its kind was found missing only just now."""
        seen = self._missing.get(key)
        if seen is None or self.monotonic() - seen[0] >= self.recheck_s / 2:
            return list(children)
        return [child for child in children if child["kind"] != POOL_KIND]

    def crd_missing(
        self,
        key: Key,
        desired: Mapping[str, Any],
        error: ApiError,
        queue: WorkQueue[Key] | None,
    ) -> bool:
        """Whether ``error`` (of applying ``desired``) says the API has no InferencePool kind;
        if so, remember it and queue ``key`` for the recheck."""
        if desired["kind"] != POOL_KIND or error.status != 404:
            return False
        if key not in self._missing:
            logger.warning(
                "%s/%s: the API server has no %s (%s): %s; retrying every %.0f s",
                *key,
                POOL_KIND,
                POOL_API_VERSION,
                error.message,
                self.recheck_s,
            )
        self._missing[key] = (self.monotonic(), error.message)
        if queue is not None:
            queue.add_after(key, self.recheck_s)
        return True

    def forget(self, key: Key) -> None:
        self._missing.pop(key, None)

    def state(self, key: Key, check: SpecCheck, live: Mapping[str, Any] | None) -> State | None:
        """The ``InferencePool`` condition of a reconcile, or None when no pool is wanted."""
        if not wants_pool(check):
            self.forget(key)
            return None
        if live is not None:
            if self._missing.pop(key, None) is not None:
                self.unwatched = True
            return ("True", "PoolApplied", self._applied(live))
        missing = self._missing.get(key)
        if missing is not None:
            message = (
                f"the API server has no {POOL_KIND} ({POOL_API_VERSION}): {missing[1]}; "
                "install the Gateway API Inference Extension's CRDs (the operator tries again "
                f"every {self.recheck_s:.0f} s); the engine pods serve through the Service "
                "meanwhile"
            )
            return ("False", CRD_NOT_INSTALLED, message)
        return ("False", "Pending", f"the {POOL_KIND} is not applied yet")

    def _applied(self, live: Mapping[str, Any]) -> str:
        spec = live.get("spec") or {}
        ref = spec.get("endpointPickerRef") or {}
        labels = (spec.get("selector") or {}).get("matchLabels") or {}
        ports = ", ".join(str(p.get("number")) for p in spec.get("targetPorts") or ())
        message = (
            f"{POOL_KIND} {live['metadata']['name']} selects the engine pods "
            f"({','.join(f'{k}={v}' for k, v in sorted(labels.items()))}) on port {ports}; "
            f"endpoint picker: Service {ref.get('name')} port "
            f"{(ref.get('port') or {}).get('number')} ({ref.get('failureMode', 'FailClose')})"
        )
        if self.unwatched:
            message += (
                f"; the {POOL_KIND} CRD was installed after the operator started, so it does not "
                "watch InferencePools: restart it (kubectl rollout restart) to repair edits"
            )
        return message
