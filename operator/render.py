"""Children of an LLMDeployment rendered from its body (pure functions, no I/O).

Invariants: every child carries the same selector labels (which never change for the life of the
LLMDeployment), is named after it, lives in its namespace and has exactly one controller owner
reference pointing at it; so deletion cascades and server-side apply sees one owner. The rendered
objects contain only fields the operator means to own: they are apply configurations. Each one
carries, in annotation ``config-hash``, a hash of everything else it contains: a live object
that merely *contains* what is rendered can still be stale (a field removed from the spec stays
on the child until the operator applies again), and the hash tells the two apart.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import constants as c
from .checks import SpecCheck
from .pod import pod_spec
from .rollout import Rollout
from .routing import POOL_API_VERSION, POOL_KIND, render_inference_pool, wants_pool

Body = Mapping[str, Any]
PDB_MIN_REPLICAS = 2
"""A PodDisruptionBudget exists exactly when spec.replicas (with autoscaling: maxReplicas) is at
least this."""
SLICE_API_VERSION, SLICE_KIND = "discovery.k8s.io/v1", "EndpointSlice"


@dataclass(frozen=True)
class Scaling:
    """What the autoscaler decided (``scaler.py``): the Deployment's replicas, and the
    activator's (address, port) while the Service needs it after a scale to zero."""

    replicas: int
    activator: tuple[str, int] | None = None


def selector_labels(name: str) -> dict[str, str]:
    """The immutable selector of the Deployment, Service, PDB and ``status.selector``."""
    return {c.LABEL_NAME: c.APP_NAME, c.LABEL_INSTANCE: name}


def selector_string(name: str) -> str:
    """``selector_labels`` in the text form that the scale subresource and HPA read."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(name).items()))


def engine_pod_selector(name: str) -> dict[str, str]:
    """The labels of exactly the engine pods (what an InferencePool selects): the selector
    labels and the engine component, which the pod template carries."""
    return {**selector_labels(name), c.LABEL_COMPONENT: "engine"}


def child_labels(name: str) -> dict[str, str]:
    return {
        **engine_pod_selector(name),
        c.LABEL_MANAGED_BY: c.MANAGED_BY,
        c.LABEL_OWNER: name,
    }


def endpoint(name: str, namespace: str) -> str:
    return f"http://{name}.{namespace}.svc:{c.HTTP_PORT}/v1"


def owner_reference(body: Body) -> dict[str, Any]:
    meta = body["metadata"]
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(body: Body) -> dict[str, Any]:
    meta = body["metadata"]
    return {
        "name": meta["name"],
        "namespace": meta["namespace"],
        "labels": child_labels(meta["name"]),
        "ownerReferences": [owner_reference(body)],
    }


def deployment_strategy(rollout: Rollout) -> dict[str, Any]:
    """The Deployment's ``strategy`` from ``spec.rollout``: by default ``maxSurge: 0,
    maxUnavailable: 1``, which replaces pods in place and needs no spare GPU."""
    if rollout.strategy == "Recreate":
        return {"type": "Recreate"}
    return {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": rollout.surge, "maxUnavailable": rollout.unavailable},
    }


def render_deployment(
    body: Body, check: SpecCheck, image: str, scaling: Scaling | None = None
) -> dict[str, Any]:
    """The engine Deployment. ``check`` must be valid; ``image`` is the operator's default;
    ``scaling`` the autoscaler's replicas (without it: spec.replicas, or minReplicas)."""
    assert check.spec is not None and check.location is not None, "render only valid specs"
    spec, name = check.spec, body["metadata"]["name"]
    replicas = spec.fixed_replicas if spec.autoscaling is None else spec.autoscaling.min_replicas
    pod_labels = {**(spec.pod_labels or {}), **child_labels(name)}
    pod_annotations = {
        "kubectl.kubernetes.io/default-container": c.ENGINE_CONTAINER,
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(c.HTTP_PORT),
        "prometheus.io/path": c.METRICS_PATH,
        **(spec.pod_annotations or {}),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(body),
        "spec": {
            "replicas": replicas if scaling is None else scaling.replicas,
            "selector": {"matchLabels": selector_labels(name)},
            "strategy": deployment_strategy(spec.rollout),
            # Loading a model is slow; the rollout deadline must outlast the startup probe.
            "progressDeadlineSeconds": spec.startup_timeout_seconds + 600,
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": {"labels": pod_labels, "annotations": pod_annotations},
                "spec": pod_spec(spec, check.location, spec.image or image),
            },
        },
    }


def render_service(body: Body) -> dict[str, Any]:
    """ClusterIP Service on port 8000 named ``http``, sending traffic to ready pods only."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(body),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(body["metadata"]["name"]),
            "ports": [{
                "name": c.HTTP_PORT_NAME,
                "port": c.HTTP_PORT,
                "targetPort": c.HTTP_PORT_NAME,
                "protocol": "TCP",
                "appProtocol": "http",
            }],
        },
    }


def render_pdb(body: Body) -> dict[str, Any]:
    """At most one engine pod voluntarily disrupted at a time. An unready pod may be evicted
    only while the budget holds (``IfHealthyBudget``): engine pods turn unready when their KV
    cache is full, and the busiest pods must not be the ones a node drain evicts past the budget.
    """
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(body),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(body["metadata"]["name"])},
            "unhealthyPodEvictionPolicy": "IfHealthyBudget",
        },
    }


def render_activator_slice(body: Body, address: str, port: int) -> dict[str, Any]:
    """An EndpointSlice of the engine Service (``kubernetes.io/service-name``) whose one
    endpoint is the activator, ``address:port``: kube-proxy sends the Service's traffic to the
    endpoints of every slice of the Service, and the EndpointSlice controller leaves slices
    managed by others alone. Named after the LLMDeployment, as its other children."""
    metadata = _metadata(body)
    metadata["labels"] = {**metadata["labels"], c.SERVICE_NAME_LABEL: body["metadata"]["name"],
                          c.SLICE_MANAGED_BY_LABEL: c.MANAGED_BY}  # fmt: skip
    return {
        "apiVersion": SLICE_API_VERSION,
        "kind": SLICE_KIND,
        "metadata": metadata,
        "addressType": "IPv6" if ":" in address else "IPv4",
        "endpoints": [{"addresses": [address], "conditions": {"ready": True}}],
        "ports": [
            {"name": c.HTTP_PORT_NAME, "port": port, "protocol": "TCP", "appProtocol": "http"}
        ],
    }


def wants_pdb(check: SpecCheck) -> bool:
    spec = check.spec
    if spec is None:
        return False
    most = spec.fixed_replicas if spec.autoscaling is None else spec.autoscaling.max_replicas
    return most >= PDB_MIN_REPLICAS


def stamp(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with annotation ``config-hash`` set to a hash of the rest of ``obj``."""
    meta = obj["metadata"]
    annotations = {
        k: v for k, v in (meta.get("annotations") or {}).items() if k != c.ANNOTATION_CONFIG_HASH
    }
    unstamped = {**obj, "metadata": {**meta, "annotations": annotations}}
    text = json.dumps(unstamped, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return {**obj, "metadata": {**meta, "annotations": {
        **annotations, c.ANNOTATION_CONFIG_HASH: digest,
    }}}


def render_children(
    body: Body, check: SpecCheck, image: str, scaling: Scaling | None = None
) -> list[dict[str, Any]]:
    """Every child the valid spec asks for, in apply order (Service first: it is cheap; the
    activator's EndpointSlice before the Deployment it stands in for; the optional
    InferencePool last)."""
    children = [render_service(body)]
    if scaling is not None and scaling.activator is not None:
        children.append(render_activator_slice(body, *scaling.activator))
    children.append(render_deployment(body, check, image, scaling))
    if wants_pdb(check):
        children.append(render_pdb(body))
    if wants_pool(check):
        assert check.spec is not None and check.spec.routing.endpoint_picker is not None
        children.append(render_inference_pool(
            _metadata(body), engine_pod_selector(body["metadata"]["name"]),
            check.spec.routing.endpoint_picker,
        ))
    return [stamp(child) for child in children]


def unwanted_children(
    check: SpecCheck, scaling: Scaling | None = None
) -> list[tuple[str, str, str]]:
    """``(apiVersion, kind, why)`` of each optional child kind the valid spec does not ask for
    (to delete where one exists)."""
    unwanted = []
    if scaling is None or scaling.activator is None:
        why = "the activator no longer stands in for the pods"
        unwanted.append((SLICE_API_VERSION, SLICE_KIND, why))
    if not wants_pdb(check):
        unwanted.append(("policy/v1", "PodDisruptionBudget", f"replicas < {PDB_MIN_REPLICAS}"))
    if not wants_pool(check):
        unwanted.append((POOL_API_VERSION, POOL_KIND, "routing.inferencePool is false"))
    return unwanted
