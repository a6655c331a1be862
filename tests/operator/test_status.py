"""Status computation (pure): phase and conditions for many cluster situations."""

from __future__ import annotations

from typing import Any

import pytest

from metroline.operator.checks import check_spec
from metroline.operator.podhealth import all_problems
from metroline.operator.status import ApplyFailure, Observed, compute_status, status_changed

from .conftest import live_body

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


QUOTA = ('pods "llama-5d8f-x" is forbidden: exceeded quota: gpus, requested: '
         'requests.nvidia.com/gpu=2, used: requests.nvidia.com/gpu=8, limited: '
         'requests.nvidia.com/gpu=8')


def deployment(desired: int, ready: int, updated: int | None = None, total: int | None = None,
               observed: bool = True, stalled: bool = False,
               refused: bool = False) -> dict[str, Any]:
    conditions = [{"type": "Progressing", "status": "False",
                   "reason": "ProgressDeadlineExceeded"}] if stalled else []
    if refused:
        conditions.append({"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
                           "message": QUOTA})
    return {
        "metadata": {"name": "llama", "generation": 3},
        "spec": {"replicas": desired},
        "status": {
            "observedGeneration": 3 if observed else 2,
            "replicas": desired if total is None else total,
            "updatedReplicas": desired if updated is None else updated, "readyReplicas": ready,
            "conditions": conditions,
        },
    }


def pod(name: str, ready: bool = True, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {
        "phase": "Running", "podIP": "10.0.0.1",
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}], **status,
    }}


def waiting(reason: str, message: str = "") -> dict[str, Any]:
    return {"containerStatuses": [{"name": "engine", "state": {
        "waiting": {"reason": reason, "message": message}}}]}


UNSCHEDULABLE = {"phase": "Pending", "conditions": [{
    "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
    "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
}]}


def compute(observed: Observed, replicas: int = 2, previous: dict | None = None,
            now: str = T0, **spec: Any) -> dict[str, Any]:
    body = live_body(generation=7, replicas=replicas, **spec)
    check = check_spec("llama", body["spec"])
    return compute_status("llama", "ml", 7, check, observed, previous, now)


def summary(status: dict[str, Any]) -> tuple[str, dict[str, tuple[str, str]]]:
    return status["phase"], {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


OK, WAIT = ("False", "AsExpected"), ("True", "WaitingForReady")
CASES = [
    ("no deployment yet", Observed(None), 2,
     ("Pending", {"Ready": ("False", "Creating"), "Progressing": ("True", "Creating"),
                  "Degraded": OK})),
    ("loading, not scheduled yet", Observed(deployment(2, 0)), 2,
     ("Pending", {"Ready": ("False", "NoReplicasReady"), "Progressing": WAIT,
                  "Degraded": OK})),
    ("loading, running", Observed(deployment(2, 0), [pod("a", False), pod("b", False)]), 2,
     ("Progressing", {"Ready": ("False", "NoReplicasReady"),
                      "Progressing": WAIT,
                      "Degraded": OK})),
    ("all ready", Observed(deployment(2, 2), [pod("a"), pod("b")]), 2,
     ("Ready", {"Ready": ("True", "AllReplicasReady"), "Progressing": ("False", "RolloutComplete"),
                "Degraded": OK})),
    ("one of two ready", Observed(deployment(2, 1), [pod("a"), pod("b", False)]), 2,
     ("Ready", {"Ready": ("True", "SomeReplicasReady"), "Progressing": WAIT,
                "Degraded": OK})),
    ("rolling a new template", Observed(deployment(2, 2, updated=1, total=3)), 2,
     ("Progressing", {"Ready": ("True", "AllReplicasReady"), "Progressing": ("True", "RollingOut"),
                      "Degraded": OK})),
    ("new spec not yet seen by the Deployment controller",
     Observed(deployment(2, 2, observed=False)),
     2, ("Progressing", {"Ready": ("True", "AllReplicasReady"),
                         "Progressing": ("True", "RollingOut"),
                         "Degraded": OK})),
    ("crash loop", Observed(deployment(1, 0), [pod("a", False, **waiting("CrashLoopBackOff"))]), 1,
     ("Degraded", {"Ready": ("False", "CrashLoopBackOff"), "Progressing": WAIT,
                   "Degraded": ("True", "CrashLoopBackOff")})),
    ("image pull", Observed(deployment(1, 0), [pod("a", False, **waiting("ImagePullBackOff"))]), 1,
     ("Degraded", {"Ready": ("False", "ImagePullBackOff"), "Progressing": WAIT,
                   "Degraded": ("True", "ImagePullBackOff")})),
    ("no GPU anywhere", Observed(deployment(1, 0), [{"metadata": {"name": "a"},
                                                      "status": UNSCHEDULABLE}]), 1,
     ("Degraded", {"Ready": ("False", "Unschedulable"), "Progressing": WAIT,
                   "Degraded": ("True", "Unschedulable")})),
    ("one crashing, one serving",
     Observed(deployment(2, 1), [pod("a"), pod("b", False, **waiting("CrashLoopBackOff"))]), 2,
     ("Degraded", {"Ready": ("True", "SomeReplicasReady"), "Progressing": WAIT,
                   "Degraded": ("True", "CrashLoopBackOff")})),
    ("rollout deadline passed, nothing ready", Observed(deployment(1, 0, stalled=True)), 1,
     ("Failed", {"Ready": ("False", "NoReplicasReady"),
                 "Progressing": ("False", "ProgressDeadlineExceeded"),
                 "Degraded": ("True", "ProgressDeadlineExceeded")})),
    ("rollout deadline passed, old pods serve", Observed(deployment(1, 1, stalled=True)), 1,
     ("Degraded", {"Ready": ("True", "AllReplicasReady"),
                   "Progressing": ("False", "ProgressDeadlineExceeded"),
                   "Degraded": ("True", "ProgressDeadlineExceeded")})),
    ("pods refused by a GPU quota", Observed(deployment(1, 0, refused=True)), 1,
     ("Degraded", {"Ready": ("False", "FailedCreate"), "Progressing": WAIT,
                   "Degraded": ("True", "FailedCreate")})),
    ("refused, and the rollout deadline passed",
     Observed(deployment(1, 0, refused=True, stalled=True)), 1,
     ("Failed", {"Ready": ("False", "FailedCreate"),
                 "Progressing": ("False", "ProgressDeadlineExceeded"),
                 "Degraded": ("True", "FailedCreate")})),
    ("scaled to zero", Observed(deployment(0, 0)), 0,
     ("Pending", {"Ready": ("False", "ScaledToZero"), "Progressing": ("False", "ScaledToZero"),
                  "Degraded": OK})),
]


@pytest.mark.parametrize(("observed", "replicas", "expected"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_phase_and_conditions(observed, replicas, expected):
    assert summary(compute(observed, replicas)) == expected


def test_invalid_spec_is_failed_with_a_message_saying_what_to_change():
    status = compute(Observed(None), engine={"tensorParallelSize": 2, "extraArgs": ["--host=x"]})
    phase, conds = summary(status)
    assert phase == "Failed"
    assert conds["Ready"] == ("False", "InvalidSpec") and conds["Progressing"][1] == "InvalidSpec"
    message = status["conditions"][0]["message"]
    assert "--host" in message and "remove it" in message
    assert status["observedGeneration"] == 7


def test_degraded_message_carries_the_pods_own_words():
    crash = waiting("CrashLoopBackOff", "back-off 5m0s restarting failed container=engine")
    crash["containerStatuses"][0]["lastState"] = {"terminated": {"reason": "OOMKilled",
                                                                 "exitCode": 137}}
    status = compute(Observed(deployment(2, 0), [pod("b", False, **crash),
                                                 pod("c", False, **waiting("ErrImagePull"))]))
    message = next(c["message"] for c in status["conditions"] if c["type"] == "Degraded")
    assert message.startswith("pod b: CrashLoopBackOff: container engine: back-off 5m0s")
    assert "OOMKilled (exit code 137)" in message and "(and 1 more pods)" in message


def test_replica_failure_message_is_the_servers():
    status = compute(Observed(deployment(1, 0, refused=True)), replicas=1)
    message = next(c["message"] for c in status["conditions"] if c["type"] == "Degraded")
    assert message == f"deployment llama: {QUOTA}"


def test_terminating_and_finished_pods_are_not_problems():
    gone = pod("old", False, **waiting("CrashLoopBackOff"))
    gone["metadata"]["deletionTimestamp"] = T0
    evicted = {"metadata": {"name": "ev"}, "status": {"phase": "Failed", "reason": "Evicted"}}
    assert all_problems([gone, evicted]) == []


def test_fields_endpoint_selector_and_kv():
    status = compute(Observed(deployment(2, 2), [pod("a"), pod("b")], kv_cache_utilization=0.4567))
    assert status["endpoint"] == "http://llama.ml.svc:8000/v1"
    assert status["selector"] == "app.kubernetes.io/instance=llama,app.kubernetes.io/name=metroline"
    assert (status["replicas"], status["readyReplicas"], status["updatedReplicas"]) == (2, 2, 2)
    assert status["kvCacheUtilization"] == 0.46
    stale_kv = compute(Observed(deployment(2, 0), kv_cache_utilization=0.5))
    assert stale_kv["kvCacheUtilization"] is None  # no ready pod, no KV figure


def test_transition_times_move_only_when_status_flips():
    first = compute(Observed(deployment(2, 0)), now=T0)
    same = compute(Observed(deployment(2, 0)), previous=first, now=T1)
    assert same == first and not status_changed(first, same)
    ready = compute(Observed(deployment(2, 2), [pod("a"), pod("b")]), previous=first, now=T1)
    times = {c["type"]: c["lastTransitionTime"] for c in ready["conditions"]}
    assert times == {"Ready": T1, "Progressing": T1, "Degraded": T0}
    assert status_changed(first, ready)


# A child the operator could not write (the API server's answer is an outcome too).

APPLY_FAILED = ApplyFailure("ApplyFailed", "could not apply the Deployment (HTTP 503): busy")
FORBIDDEN = ApplyFailure("Forbidden", 'the API server forbids the apply of the Deployment: '
                                      'deployments.apps "llama" is forbidden')
FAILURE_CASES = [
    ("apply failed, nothing yet", Observed(None), APPLY_FAILED,
     ("Pending", {"Ready": ("Unknown", "ApplyFailed"), "Progressing": ("Unknown", "ApplyFailed"),
                  "Degraded": OK})),
    ("apply failed, old pods serve", Observed(deployment(2, 2), [pod("a"), pod("b")]),
     APPLY_FAILED,
     ("Progressing", {"Ready": ("Unknown", "ApplyFailed"),
                      "Progressing": ("Unknown", "ApplyFailed"), "Degraded": OK})),
    ("apply failed, pods crash",
     Observed(deployment(2, 0), [pod("a", False, **waiting("CrashLoopBackOff"))]), APPLY_FAILED,
     ("Degraded", {"Ready": ("Unknown", "ApplyFailed"), "Progressing": ("Unknown", "ApplyFailed"),
                   "Degraded": ("True", "CrashLoopBackOff")})),
    ("forbidden, nothing yet", Observed(None), FORBIDDEN,
     ("Degraded", {"Ready": ("False", "Forbidden"), "Progressing": ("False", "Forbidden"),
                   "Degraded": ("True", "Forbidden")})),
    ("forbidden, old pods serve", Observed(deployment(2, 2), [pod("a"), pod("b")]), FORBIDDEN,
     ("Degraded", {"Ready": ("True", "AllReplicasReady"), "Progressing": ("False", "Forbidden"),
                   "Degraded": ("True", "Forbidden")})),
    ("forbidden, pods crash",
     Observed(deployment(1, 0), [pod("a", False, **waiting("CrashLoopBackOff"))]), FORBIDDEN,
     ("Degraded", {"Ready": ("False", "CrashLoopBackOff"), "Progressing": ("False", "Forbidden"),
                   "Degraded": ("True", "CrashLoopBackOff")})),
]


@pytest.mark.parametrize(("observed", "failure", "expected"),
                         [case[1:] for case in FAILURE_CASES], ids=[c[0] for c in FAILURE_CASES])
def test_a_failed_write_is_in_status(observed, failure, expected):
    body = live_body(generation=7, replicas=2)
    status = compute_status("llama", "ml", 7, check_spec("llama", body["spec"]), observed, None,
                            T0, failure=failure)  # fmt: skip
    assert summary(status) == expected
    assert status["observedGeneration"] == 7
    assert all(c["observedGeneration"] == 7 for c in status["conditions"])
    assert failure.message in {c["message"] for c in status["conditions"]}


def test_an_invalid_spec_outranks_a_failed_write():
    body = live_body(generation=7, engine={"tensorParallelSize": 2, "extraArgs": ["--port=1"]})
    status = compute_status("llama", "ml", 7, check_spec("llama", body["spec"]), Observed(None),
                            None, T0, failure=APPLY_FAILED)  # fmt: skip
    assert summary(status)[1]["Ready"] == ("False", "InvalidSpec")
