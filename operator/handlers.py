"""Thin kopf handlers: configure kopf, log in, and forward watch events to the controller.

No handler changes anything in the cluster; the controller does (only while its replica holds
the Lease, see ``leader.py``; a standby's handlers still fill the cache). Only event handlers
are used (no create/update/delete handlers), so kopf keeps no progress annotations, adds no
finalizers, and never writes an LLMDeployment's ``spec`` or metadata.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from . import constants as c
from .controller import Controller

MANAGED = {c.LABEL_MANAGED_BY: c.MANAGED_BY}


def login(settings: kopf.OperatorSettings, **kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod, the service account; elsewhere, $KUBECONFIG or ~/.kube/config."""
    return kopf.login_with_service_account(settings=settings, **kwargs) or \
        kopf.login_with_kubeconfig(settings=settings, **kwargs)


def build_registry(controller: Controller) -> kopf.OperatorRegistry:
    """A fresh kopf registry whose handlers feed ``controller``."""
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # No kopf peering: it would only pause kopf's watchers. Both replicas watch (a warm
        # cache); the controller's Lease (leader.py) decides which one writes.
        settings.peering.standalone = True
        settings.scanning.disabled = True  # no cluster-wide CRD watch (least privilege)
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 270
        settings.watching.client_timeout = 300
        settings.watching.connect_timeout = 30
        settings.networking.request_timeout = 60
        await controller.start()

    @kopf.on.cleanup(registry=registry)
    async def shutdown(**_: Any) -> None:
        await controller.stop()

    @kopf.on.login(registry=registry)
    async def authenticate(
        settings: kopf.OperatorSettings, **kwargs: Any
    ) -> kopf.ConnectionInfo | None:
        # Async on purpose: kopf runs sync handlers in threads, and the client's asyncio
        # primitives belong to the operator's event loop.
        info = login(settings=settings, **kwargs)
        if info is not None:
            controller.client.reauthenticate = lambda: login(settings=settings, **kwargs)
            controller.client.connect(info)
        return info

    @kopf.on.event(c.GROUP, c.VERSION, c.PLURAL, registry=registry)
    async def llmdeployment_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        controller.on_llmd(type, body)

    def forward(kind: str) -> Any:
        async def handler(type: str | None, body: kopf.Body, **_: Any) -> None:
            controller.on_child(kind, type, body)
        return handler

    # Children are matched by owner reference, not label, so a child stripped of its labels is
    # still seen (and repaired). Pods are matched by label: ReplicaSets, not we, own them.
    kopf.on.event("apps", "v1", "deployments", registry=registry,
                  id="deployment_event")(forward("Deployment"))
    kopf.on.event("", "v1", "services", registry=registry,
                  id="service_event")(forward("Service"))
    kopf.on.event("policy", "v1", "poddisruptionbudgets", registry=registry,
                  id="pdb_event")(forward("PodDisruptionBudget"))
    # Only the activator's slices (managed-by us); the EndpointSlice controller's are skipped.
    kopf.on.event("discovery.k8s.io", "v1", "endpointslices", registry=registry,
                  labels={c.SLICE_MANAGED_BY_LABEL: c.MANAGED_BY},
                  id="endpointslice_event")(forward("EndpointSlice"))
    # Watched only if the extension's CRD exists when kopf starts (it resolves kinds once).
    kopf.on.event("inference.networking.k8s.io", "v1", "inferencepools", registry=registry,
                  id="inferencepool_event")(forward("InferencePool"))

    @kopf.on.event("", "v1", "pods", labels=MANAGED, registry=registry)
    async def pod_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        controller.on_pod(type, body)

    return registry
