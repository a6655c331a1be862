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
from typing import Any

from . import constants as c
from .checks import SpecCheck
from .pod import pod_spec
from .rollout import Rollout

Body = Mapping[str, Any]
PDB_MIN_REPLICAS = 2
"""A PodDisruptionBudget exists exactly when spec.replicas is at least this."""


def selector_labels(name: str) -> dict[str, str]:
    """The immutable selector of the Deployment, Service, PDB and ``status.selector``."""
    return {c.LABEL_NAME: c.APP_NAME, c.LABEL_INSTANCE: name}


def selector_string(name: str) -> str:
    """``selector_labels`` in the text form that the scale subresource and HPA read."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(name).items()))


def child_labels(name: str) -> dict[str, str]:
    return {
        **selector_labels(name),
        c.LABEL_COMPONENT: "engine",
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


def render_deployment(body: Body, check: SpecCheck, image: str) -> dict[str, Any]:
    """The engine Deployment. ``check`` must be valid; ``image`` is the operator's default."""
    assert check.spec is not None and check.location is not None, "render only valid specs"
    spec, name = check.spec, body["metadata"]["name"]
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
            "replicas": spec.replicas,
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


def wants_pdb(check: SpecCheck) -> bool:
    return check.spec is not None and check.spec.replicas >= PDB_MIN_REPLICAS


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


def render_children(body: Body, check: SpecCheck, image: str) -> list[dict[str, Any]]:
    """Every child the valid spec asks for, in apply order (Service first: it is cheap)."""
    children = [render_service(body), render_deployment(body, check, image)]
    if wants_pdb(check):
        children.append(render_pdb(body))
    return [stamp(child) for child in children]
