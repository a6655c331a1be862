"""What is wrong with a pod, in the pod's own words (pure functions).

A problem is reported with the kubelet's or scheduler's reason (CrashLoopBackOff,
ImagePullBackOff, Unschedulable, ...) and message, so status never says Ready while pods crash.
Terminating and finished pods are ignored: the Deployment is already replacing them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Pod = Mapping[str, Any]

WAITING_PROBLEMS = frozenset({
    "CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "ErrImageNeverPull",
    "InvalidImageName", "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
})


@dataclass(frozen=True, slots=True)
class PodProblem:
    """One reason a pod cannot serve, e.g. ``("llama-7d9f-x2", "CrashLoopBackOff", "...")``."""

    pod: str
    reason: str
    message: str

    def describe(self) -> str:
        return f"pod {self.pod}: {self.reason}: {self.message}".rstrip(": ")


def is_live(pod: Pod) -> bool:
    """Neither terminating nor finished: a pod the Deployment still counts on."""
    if pod.get("metadata", {}).get("deletionTimestamp"):
        return False
    return pod.get("status", {}).get("phase") not in ("Succeeded", "Failed")


def is_ready(pod: Pod) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    ready = any(cond.get("type") == "Ready" and cond.get("status") == "True" for cond in conditions)
    return ready and is_live(pod)


def is_running(pod: Pod) -> bool:
    return is_live(pod) and pod.get("status", {}).get("phase") == "Running"


def _last_exit(status: Mapping[str, Any]) -> str:
    terminated = (status.get("lastState") or {}).get("terminated") or {}
    if not terminated:
        return ""
    reason = terminated.get("reason") or "Error"
    return f"; last exit: {reason} (exit code {terminated.get('exitCode', '?')})"


def _container_problems(name: str, statuses: Iterable[Mapping[str, Any]]) -> list[PodProblem]:
    problems = []
    for status in statuses:
        waiting = (status.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        if reason in WAITING_PROBLEMS:
            detail = waiting.get("message") or reason
            message = f"container {status.get('name')}: {detail}{_last_exit(status)}"
            problems.append(PodProblem(name, reason, message))
    return problems


def pod_problems(pod: Pod) -> list[PodProblem]:
    """Problems of one live pod, scheduling first, then init containers, then containers."""
    if not is_live(pod):
        return []
    name = pod.get("metadata", {}).get("name", "?")
    status = pod.get("status") or {}
    problems = []
    for cond in status.get("conditions") or []:
        if (cond.get("type") == "PodScheduled" and cond.get("status") == "False"
                and cond.get("reason") == "Unschedulable"):
            problems.append(PodProblem(name, "Unschedulable", cond.get("message") or ""))
    problems += _container_problems(name, status.get("initContainerStatuses") or [])
    problems += _container_problems(name, status.get("containerStatuses") or [])
    return problems


def all_problems(pods: Iterable[Pod]) -> list[PodProblem]:
    """Problems of all pods, ordered by pod name so that the reported one is stable."""
    ordered = sorted(pods, key=lambda p: p.get("metadata", {}).get("name", ""))
    return [problem for pod in ordered for problem in pod_problems(pod)]
