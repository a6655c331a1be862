"""The operator's view of the cluster, fed by kopf's watch events.

Invariants: objects are stored as plain JSON dicts keyed by the LLMDeployment they belong to,
``(namespace, name)``; a child belongs to the LLMDeployment named in its controller owner
reference, a pod to the one named in its instance label (pods are owned by ReplicaSets);
anything else is ignored. A stored object is replaced only by one with the same or a newer
``resourceVersion`` when both are numeric, so a late watch event cannot undo a fresher write.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from . import constants as c

Key = tuple[str, str]
Obj = dict[str, Any]
CHILD_KINDS = ("Deployment", "Service", "PodDisruptionBudget", "InferencePool", "EndpointSlice")


def plain(body: Mapping[str, Any]) -> Obj:
    """A deep, plain-dict copy of a kopf body or any JSON-like mapping."""
    return json.loads(json.dumps(body, default=dict))


def _newer_or_same(new: Mapping[str, Any], old: Mapping[str, Any] | None) -> bool:
    if old is None:
        return True
    new_rv = new.get("metadata", {}).get("resourceVersion", "")
    old_rv = old.get("metadata", {}).get("resourceVersion", "")
    if str(new_rv).isdigit() and str(old_rv).isdigit():
        return int(new_rv) >= int(old_rv)
    return True


def owner_key(obj: Mapping[str, Any]) -> Key | None:
    """The LLMDeployment that controls ``obj``, or None."""
    meta = obj.get("metadata", {})
    for ref in meta.get("ownerReferences") or []:
        ours = ref.get("kind") == c.KIND and ref.get("apiVersion", "").startswith(c.GROUP + "/")
        if ours and ref.get("controller"):
            return (meta.get("namespace", ""), ref["name"])
    return None


def pod_key(pod: Mapping[str, Any]) -> Key | None:
    meta = pod.get("metadata", {})
    labels = meta.get("labels") or {}
    if labels.get(c.LABEL_MANAGED_BY) != c.MANAGED_BY or c.LABEL_INSTANCE not in labels:
        return None
    return (meta.get("namespace", ""), labels[c.LABEL_INSTANCE])


class ClusterCache:
    def __init__(self) -> None:
        self._llmds: dict[Key, Obj] = {}
        self._children: dict[tuple[str, Key], Obj] = {}
        self._pods: dict[Key, dict[str, Obj]] = {}

    # LLMDeployments
    def put_llmd(self, body: Mapping[str, Any]) -> Key:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if _newer_or_same(body, self._llmds.get(key)):
            self._llmds[key] = plain(body)
        return key

    def drop_llmd(self, key: Key) -> None:
        self._llmds.pop(key, None)

    def llmd(self, key: Key) -> Obj | None:
        return self._llmds.get(key)

    def llmd_keys(self) -> list[Key]:
        return list(self._llmds)

    # Deployments, Services, PodDisruptionBudgets, InferencePools, the activator's EndpointSlice
    def put_child(
        self, obj: Mapping[str, Any], kind: str | None = None, deleted: bool = False
    ) -> Key | None:
        kind = kind or obj.get("kind")
        key = owner_key(obj)
        if key is None or kind not in CHILD_KINDS:
            return None
        slot = (kind, key)
        if deleted:
            self._children.pop(slot, None)
        elif _newer_or_same(obj, self._children.get(slot)):
            self._children[slot] = plain(obj)
        return key

    def child(self, key: Key, kind: str) -> Obj | None:
        return self._children.get((kind, key))

    # Pods
    def put_pod(self, pod: Mapping[str, Any], deleted: bool = False) -> Key | None:
        key = pod_key(pod)
        if key is None:
            return None
        name = pod["metadata"]["name"]
        pods = self._pods.setdefault(key, {})
        if deleted:
            pods.pop(name, None)
        elif _newer_or_same(pod, pods.get(name)):
            pods[name] = plain(pod)
        return key

    def pods(self, key: Key) -> list[Obj]:
        return list(self._pods.get(key, {}).values())
