"""Kubernetes Events: the pure rules (which transitions become which events), the Event bodies
against the real Kubernetes schemas, and the operator writing them over HTTP."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import kmock
import kubernetes_validate
import pytest

from metroline.operator import constants as c
from metroline.operator.checks import check_spec
from metroline.operator.events import EventNote, condition_events, event_body
from metroline.operator.status import Observed, compute_status

from .conftest import K8S_VERSIONS, LLMD, NS, Cluster, live_body, llmd_body
from .test_operator_flow import create, patch_spec, play_deployment_controller, status

EVENTS = kmock.resource("", "v1", "events")
NOW = "2026-11-26T08:00:00Z"


def cond(kind: str, status: str, reason: str, message: str = "") -> dict[str, Any]:
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": NOW, "observedGeneration": 1}  # fmt: skip


def conditions(*items: dict[str, Any]) -> dict[str, Any]:
    return {"conditions": list(items)}


def test_no_change_no_event():
    state = conditions(cond("Ready", "True", "AllReplicasReady", "1/1 replicas ready"),
                       cond("Degraded", "False", "AsExpected"))  # fmt: skip
    assert condition_events(state, copy.deepcopy(state)) == []


def test_a_message_change_alone_is_not_an_event():
    old = conditions(cond("Ready", "False", "NoReplicasReady", "0/2 replicas ready"))
    new = conditions(cond("Ready", "False", "NoReplicasReady", "0/2 replicas ready, 1 updated"))
    assert condition_events(old, new) == []


def test_a_new_object_reports_its_conditions_but_not_that_nothing_is_wrong():
    new = conditions(
        cond("Ready", "False", "Creating", "the engine Deployment is being created"),
        cond("Progressing", "True", "Creating", "the engine Deployment is being created"),
        cond("Degraded", "False", "AsExpected"),
    )
    notes = condition_events(None, new)
    # Ready and Progressing say the same: one event.
    assert notes == [EventNote("Normal", "Creating",
                               "Ready is False: the engine Deployment is being created")]


def test_problems_are_warnings_and_recovery_is_normal():
    healthy = conditions(cond("Ready", "True", "AllReplicasReady", "1/1"),
                         cond("Degraded", "False", "AsExpected"))  # fmt: skip
    crashing = conditions(
        cond("Ready", "False", "CrashLoopBackOff", "pod llama-0: CrashLoopBackOff"),
        cond("Degraded", "True", "CrashLoopBackOff", "pod llama-0: CrashLoopBackOff"),
    )
    # Ready=False and Degraded=True say the same words: one event, a Warning.
    assert condition_events(healthy, crashing) == [EventNote(
        "Warning", "CrashLoopBackOff", "Ready is False: pod llama-0: CrashLoopBackOff")]
    only_degraded = conditions(cond("Ready", "True", "AllReplicasReady", "1/1"),
                               cond("Degraded", "True", "OOMKilled", "pod llama-0: OOMKilled"))
    notes = condition_events(healthy, only_degraded)
    assert notes == [EventNote("Warning", "OOMKilled", "Degraded is True: pod llama-0: OOMKilled")]
    notes = condition_events(only_degraded, healthy)
    assert notes == [EventNote("Normal", "Recovered", "Degraded is False: no pod problem remains")]


def test_invalid_spec_and_stalled_rollouts_are_warnings():
    invalid = conditions(cond("Ready", "False", "InvalidSpec", "extraArgs: --port is managed"),
                         cond("Progressing", "False", "InvalidSpec",
                              "extraArgs: --port is managed"))  # fmt: skip
    assert condition_events(None, invalid) == [
        EventNote("Warning", "InvalidSpec", "Ready is False: extraArgs: --port is managed")
    ]
    stalled = conditions(cond("Progressing", "False", "ProgressDeadlineExceeded", "stalled"))
    rolling = conditions(cond("Progressing", "True", "RollingOut", "0/1"))
    assert [n.type for n in condition_events(rolling, stalled)] == ["Warning"]


def test_long_messages_are_cut():
    new = conditions(cond("Ready", "False", "InvalidSpec", "x" * 5000))
    assert len(condition_events(None, new)[0].message) == 1024


def test_statuses_from_compute_status_give_the_expected_story():
    """Creation to ready through the real status computation: each step's events."""
    body = live_body()
    check = check_spec("llama", body["spec"])
    dep = {"metadata": {"name": "llama", "generation": 1},
           "status": {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1,
                      "readyReplicas": 0}}  # fmt: skip
    creating = compute_status("llama", NS, 1, check, Observed(None), None, NOW)
    starting = compute_status("llama", NS, 1, check, Observed(dep), creating, NOW)
    ready_dep = copy.deepcopy(dep)
    ready_dep["status"]["readyReplicas"] = 1
    ready = compute_status("llama", NS, 1, check, Observed(ready_dep), starting, NOW)
    story = [condition_events(None, creating), condition_events(creating, starting),
             condition_events(starting, ready), condition_events(ready, ready)]  # fmt: skip
    assert [[n.reason for n in notes] for notes in story] == [
        ["Creating"], ["NoReplicasReady", "WaitingForReady"],
        ["AllReplicasReady", "RolloutComplete"], [],
    ]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_event_bodies_pass_the_real_schema(version):
    note = EventNote("Warning", "InvalidSpec", "Ready is False: bad")
    event = event_body(live_body(), note, NOW, "metroline-operator-7d9f-abcde")
    assert kubernetes_validate.validate(event, version, strict=True)
    assert event["involvedObject"] == {
        "apiVersion": c.API_VERSION, "kind": c.KIND, "name": "llama", "namespace": NS,
        "uid": "uid-llama", "resourceVersion": "1",
    }  # fmt: skip
    other = event_body(live_body(), note, NOW, "x")
    assert other["metadata"]["name"] != event["metadata"]["name"]
    assert event["metadata"]["name"].startswith("llama.")


# Over HTTP, with the real operator.


def ours(cluster: Cluster, name: str = "llama") -> list[tuple[str, str, str]]:
    """(type, reason, message) of the operator's events about ``name``, oldest first."""
    found = [
        obj.raw for (resource, _, _), obj in list(cluster.emulator.objects.items())
        if resource == EVENTS and not obj.deleted
        and obj.raw["involvedObject"]["name"] == name
        and obj.raw["source"]["component"] == c.FIELD_MANAGER
    ]  # fmt: skip
    found.sort(key=lambda event: event["metadata"]["name"])
    return [(event["type"], event["reason"], event["message"]) for event in found]


@pytest.mark.asyncio
async def test_the_operator_records_writes_and_transitions_once(cluster, operator):
    await create(cluster, llmd_body(replicas=2))
    await cluster.wait_for(lambda: ("Normal", "Created", "created PodDisruptionBudget llama")
                           in ours(cluster))  # fmt: skip
    await play_deployment_controller(cluster, ready=2)
    await cluster.wait_for(lambda: status(cluster).get("phase") == "Ready")
    await cluster.wait_for(lambda: any(e[1] == "RolloutComplete" for e in ours(cluster)))
    events = ours(cluster)
    reasons = [reason for _, reason, _ in events]
    for expected in ("Created", "AllReplicasReady", "RolloutComplete"):
        assert expected in reasons, events
    assert {m for _, r, m in events if r == "Created"} == {
        "created Deployment llama", "created Service llama", "created PodDisruptionBudget llama",
    }
    assert all(kind == "Normal" for kind, _, _ in events), events
    # Resyncs and unrelated watch events change nothing: no new events.
    await asyncio.sleep(0.5)
    assert ours(cluster) == events
    # Scaling to 1 deletes the PDB and updates the Deployment.
    await patch_spec(cluster, {"replicas": 1})
    await cluster.wait_for(lambda: ("Normal", "Deleted",
                                    "deleted PodDisruptionBudget llama (replicas < 2)")
                           in ours(cluster))  # fmt: skip
    assert ("Normal", "Updated", "updated Deployment llama") in ours(cluster)


@pytest.mark.asyncio
async def test_an_invalid_spec_is_one_warning(cluster, operator):
    await create(cluster, llmd_body(engine={"tensorParallelSize": 2,
                                            "extraArgs": ["--port", "9000"]}))  # fmt: skip
    await cluster.wait_for(lambda: status(cluster).get("phase") == "Failed")
    await cluster.wait_for(lambda: ours(cluster))
    await asyncio.sleep(0.3)
    events = ours(cluster)
    assert len(events) == 1 and events[0][:2] == ("Warning", "InvalidSpec"), events
    assert "--port" in events[0][2]


@pytest.mark.asyncio
async def test_a_refused_event_does_not_stop_reconciling(cluster, operator):
    cluster.emulator.fail("POST", "/events$", 403, times=1000)
    await create(cluster, llmd_body())
    await cluster.wait_for(lambda: status(cluster).get("phase") == "Pending")
    await play_deployment_controller(cluster, ready=1)
    await cluster.wait_for(lambda: status(cluster).get("phase") == "Ready")
    assert ours(cluster) == [] and operator.failures == {}
    assert cluster.get(LLMD, "llama") is not None
