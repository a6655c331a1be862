"""LLMDeployment status from what the cluster says (pure functions).

Inputs are the spec verdict, the observed Deployment (or None) and pods, and a KV-cache sample;
output is the whole ``status`` as a JSON merge patch (absent values are ``None``, which removes
them). Invariants: ``phase`` is Ready only with a ready pod, no pod problem and the latest
template rolled out; any pod problem, or pods the API server refuses to create (the Deployment's
``ReplicaFailure``, e.g. a GPU quota), makes ``phase`` Degraded (or Failed when nothing is ready
and the rollout deadline passed) and condition Degraded=True with the pod's or the server's own
reason and message; a condition's ``lastTransitionTime`` changes only when its ``status`` does.

A failed write of a child is an outcome too (``ApplyFailure``, what the API server said): 403
(``Forbidden``: quota, admission webhooks, RBAC) reads like pods that cannot be created —
Degraded=True, Progressing=False, Ready False unless pods still serve — and any other failure
(``ApplyFailed``: 5xx, timeouts) makes Ready and Progressing ``Unknown``: the operator cannot
tell what the cluster will run. Either way ``phase`` is not Ready (the latest spec is not rolled
out) and every condition carries ``observedGeneration``. A spec the API server refuses as such
(400, 422, an undeclared field) is ``InvalidSpec``, like one the operator refuses itself.
With ``spec.autoscaling`` the replicas judged against are the autoscaler's (``scaler.py``), and
``status.autoscaling`` with conditions ``ScalingLimited`` (and ``ScaledToZero`` when it may
scale to zero) are its report. With ``routing.inferencePool`` a fourth condition,
``InferencePool``, reports on the pool (``routing.py``); it never changes ``phase``: the engine
pods serve through the Service anyway.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .autoscale import ScalingReport
from .checks import SpecCheck
from .podhealth import Pod, PodProblem, all_problems, is_running
from .render import endpoint, selector_string
from .routing import CONDITION as POOL_CONDITION

Status = dict[str, Any]
MAX_MESSAGE = 1024

# Condition reasons for failures; each new message of these is a new failure (see events.py).
INVALID_SPEC = "InvalidSpec"
FORBIDDEN = "Forbidden"
APPLY_FAILED = "ApplyFailed"
FAILURE_REASONS = frozenset({INVALID_SPEC, FORBIDDEN, APPLY_FAILED})


@dataclass(frozen=True)
class ApplyFailure:
    """Why the latest write of a child did not go through: ``reason`` is FORBIDDEN or
    APPLY_FAILED, ``message`` says which child and quotes the API server."""

    reason: str
    message: str


@dataclass(frozen=True)
class Observed:
    """What the cluster holds for one LLMDeployment."""

    deployment: Mapping[str, Any] | None
    pods: Sequence[Pod] = field(default_factory=tuple)
    kv_cache_utilization: float | None = None
    inference_pool: tuple[str, str, str] | None = None
    """The ``InferencePool`` condition's state (``routing.InferencePools.state``); None: no
    pool wanted, no condition."""
    autoscaling: ScalingReport | None = None
    """With ``spec.autoscaling``: the replicas it chose, ``status.autoscaling`` and its
    conditions (``scaler.py``)."""


@dataclass(frozen=True)
class _Verdict:
    phase: str
    ready: tuple[str, str, str]  # status, reason, message
    progressing: tuple[str, str, str]
    degraded: tuple[str, str, str]


def find_condition(
    conditions: Sequence[Mapping[str, Any]], kind: str
) -> Mapping[str, Any] | None:
    """The condition of type ``kind`` in ``conditions``, or None."""
    return next((cond for cond in conditions if cond.get("type") == kind), None)


def condition(
    previous: Sequence[Mapping[str, Any]], kind: str, state: tuple[str, str, str],
    generation: int, now: str,
) -> dict[str, Any]:
    """A metav1.Condition; keeps the old lastTransitionTime while ``status`` is unchanged."""
    status, reason, message = state
    old = find_condition(previous, kind)
    since = old["lastTransitionTime"] if old and old.get("status") == status else now
    return {
        "type": kind, "status": status, "reason": reason, "message": message[:MAX_MESSAGE],
        "lastTransitionTime": since, "observedGeneration": generation,
    }


def _problem_summary(problems: Sequence[PodProblem]) -> str:
    more = len({p.pod for p in problems[1:]} - {problems[0].pod})
    return problems[0].describe() + (f" (and {more} more pods)" if more else "")


def _deadline_exceeded(deployment: Mapping[str, Any]) -> bool:
    conditions = deployment.get("status", {}).get("conditions") or []
    return any(
        cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded"
        for cond in conditions
    )


def _replica_failure(deployment: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """Degraded=True when pods cannot even be created (quota, admission), in the server's words."""
    for cond in deployment.get("status", {}).get("conditions") or []:
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            name = deployment.get("metadata", {}).get("name", "?")
            message = f"deployment {name}: {cond.get('message') or 'pods cannot be created'}"
            return ("True", cond.get("reason") or "ReplicaFailure", message)
    return None


def _judge(check: SpecCheck, observed: Observed, counts: Mapping[str, int]) -> _Verdict:
    ok = ("False", "AsExpected", "")
    problems = all_problems(observed.pods)
    degraded = ("True", problems[0].reason, _problem_summary(problems)) if problems else ok
    if not check.valid:
        message = "; ".join(check.problems)
        invalid = ("False", INVALID_SPEC, message)
        return _Verdict("Failed", invalid, invalid, degraded)
    assert check.spec is not None
    scaling, dep = observed.autoscaling, observed.deployment
    desired = check.spec.fixed_replicas if scaling is None else scaling.desired
    if dep is None:
        waiting = ("False", "Creating", "the engine Deployment is being created")
        return _Verdict("Pending", waiting, ("True", "Creating", waiting[2]), degraded)
    failure = None if problems else _replica_failure(dep)
    if failure is not None:
        degraded = failure
    ready, updated, total = counts["ready"], counts["updated"], counts["total"]
    tally = f"{ready}/{desired} replicas ready, {updated}/{desired} updated"
    dep_generation = dep["metadata"].get("generation", 1)
    seen = dep.get("status", {}).get("observedGeneration", 0) >= dep_generation
    rolled_out = seen and updated >= desired and total <= desired
    if desired == 0:
        zero = ("False", "ScaledToZero", "spec.replicas is 0; scale up to serve"
                if scaling is None else scaling.zero_message)
        done = ("False", "ScaledToZero", "no replicas requested")
        return _Verdict("Pending", zero, done if rolled_out else ("True", "ScalingDown", tally),
                        degraded)
    if _deadline_exceeded(dep):
        stalled = ("False", "ProgressDeadlineExceeded", f"rollout stalled: {tally}")
        if degraded[0] != "True":
            degraded = ("True", "ProgressDeadlineExceeded", stalled[2])
    elif rolled_out and ready >= desired:
        stalled = ("False", "RolloutComplete", tally)
    else:
        stalled = ("True", "RollingOut" if not rolled_out else "WaitingForReady", tally)
    if ready >= 1:
        reason = "AllReplicasReady" if ready >= desired else "SomeReplicasReady"
        ready_state = ("True", reason, tally)
    elif problems or failure is not None:
        ready_state = ("False", degraded[1], degraded[2])
    else:
        ready_state = ("False", "NoReplicasReady", f"{tally}; engines are starting")
    if degraded[0] == "True":
        phase = "Failed" if ready == 0 and stalled[1] == "ProgressDeadlineExceeded" else "Degraded"
    elif ready >= 1 and rolled_out:
        phase = "Ready"
    elif ready >= 1 or any(is_running(pod) for pod in observed.pods):
        phase = "Progressing"
    else:
        phase = "Pending"
    return _Verdict(phase, ready_state, stalled, degraded)


def _failed(verdict: _Verdict, failure: ApplyFailure, observed: Observed, ready: int) -> _Verdict:
    """``verdict`` of what runs, amended by a child the operator could not write."""
    message = failure.message
    serving = ready >= 1 and verdict.ready[0] == "True"
    if failure.reason == FORBIDDEN:
        # Like pods that cannot be created: pod problems keep Degraded, old pods keep serving.
        problems = all_problems(observed.pods)
        degraded = verdict.degraded if problems else ("True", FORBIDDEN, message)
        ready_state = verdict.ready if serving else ("False", degraded[1], degraded[2])
        return _Verdict("Degraded", ready_state, ("False", FORBIDDEN, message), degraded)
    unknown = ("Unknown", failure.reason, message)
    if verdict.degraded[0] == "True":
        phase = "Degraded"
    elif ready >= 1 or any(is_running(pod) for pod in observed.pods):
        phase = "Progressing"
    else:
        phase = "Pending"
    return _Verdict(phase, unknown, unknown, verdict.degraded)


def compute_status(
    name: str, namespace: str, generation: int, check: SpecCheck, observed: Observed,
    previous: Mapping[str, Any] | None, now: str, *, failure: ApplyFailure | None = None,
) -> Status:
    """The full status of LLMDeployment ``namespace/name`` at ``generation``; ``failure`` is
    why the latest write of a child did not go through (None: every write went through)."""
    dep_status = (observed.deployment or {}).get("status") or {}
    counts = {
        "ready": int(dep_status.get("readyReplicas") or 0),
        "updated": int(dep_status.get("updatedReplicas") or 0),
        "total": int(dep_status.get("replicas") or 0),
    }
    verdict = _judge(check, observed, counts)
    if failure is not None and check.valid:
        verdict = _failed(verdict, failure, observed, counts["ready"])
    old = (previous or {}).get("conditions") or []
    kv, scaling = observed.kv_cache_utilization, observed.autoscaling
    return {
        "observedGeneration": generation,
        "replicas": counts["total"],
        "readyReplicas": counts["ready"],
        "updatedReplicas": counts["updated"],
        "selector": selector_string(name),
        "endpoint": endpoint(name, namespace),
        "kvCacheUtilization": None if kv is None or counts["ready"] == 0 else round(kv, 2),
        "autoscaling": None if scaling is None else dict(scaling.status),
        "phase": verdict.phase,
        "conditions": [
            condition(old, "Ready", verdict.ready, generation, now),
            condition(old, "Progressing", verdict.progressing, generation, now),
            condition(old, "Degraded", verdict.degraded, generation, now),
            *([] if observed.inference_pool is None else [
                condition(old, POOL_CONDITION, observed.inference_pool, generation, now)]),
            *(condition(old, kind, state, generation, now)
              for kind, state in (scaling.conditions if scaling else ())),
        ],
    }


def status_changed(current: Mapping[str, Any] | None, new: Status) -> bool:
    """Whether patching ``new`` would change anything (``None`` means absent)."""
    current = current or {}
    return any(current.get(key) != value for key, value in new.items())
