"""Kubernetes Events: the pure rules (which transitions become which events), the Event bodies
against the real Kubernetes schemas, and the operator writing them over HTTP (the recorder
against a fake events API is in ``test_event_recorder.py``)."""

from __future__ import annotations

import asyncio
import copy
import logging
import re
from collections import Counter
from typing import Any

import kmock
import kubernetes_validate
import pytest

from metroline.operator import constants as c
from metroline.operator.checks import check_spec
from metroline.operator.events import EventNote, condition_events, event_body, event_name
from metroline.operator.status import Observed, compute_status

from .conftest import K8S_VERSIONS, LLMD, NS, Cluster, live_body, llmd_body, run_operator
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
    assert notes == [EventNote("Normal", "Recovered", "Degraded is False (was OOMKilled)")]


def test_the_last_ready_pod_crashing_while_already_degraded_is_a_warning():
    """Two replicas, one crash-looping (Degraded unchanged); then the other crashes too."""
    before = conditions(
        cond("Ready", "True", "SomeReplicasReady", "1/2"),
        cond("Degraded", "True", "CrashLoopBackOff", "pod llama-1: CrashLoopBackOff"),
    )
    after = conditions(
        cond("Ready", "False", "CrashLoopBackOff", "pod llama-0: CrashLoopBackOff (and 1 more)"),
        cond("Degraded", "True", "CrashLoopBackOff", "pod llama-0: CrashLoopBackOff (and 1 more)"),
    )
    assert [(n.type, n.reason) for n in condition_events(before, after)] == [
        ("Warning", "CrashLoopBackOff")
    ]


def test_an_outage_is_a_warning_but_scaling_to_zero_is_not():
    ready = conditions(cond("Ready", "True", "AllReplicasReady", "2/2"))
    unready = conditions(cond("Ready", "False", "NoReplicasReady", "0/2; engines are starting"))
    assert [n.type for n in condition_events(ready, unready)] == ["Warning"]
    # A new object whose engines are still starting is not an outage.
    assert [n.type for n in condition_events(None, unready)] == ["Normal"]
    zero = conditions(cond("Ready", "False", "ScaledToZero", "spec.replicas is 0"))
    assert [n.type for n in condition_events(ready, zero)] == ["Normal"]


def test_recovered_is_said_only_when_something_serves():
    """A crash loop's container runs between back-offs: Degraded clears while nothing is
    ready. That is not a recovery."""
    crashing = conditions(
        cond("Ready", "False", "CrashLoopBackOff", "pod llama-0: CrashLoopBackOff"),
        cond("Degraded", "True", "CrashLoopBackOff", "pod llama-0: CrashLoopBackOff"),
    )
    between = conditions(cond("Ready", "False", "NoReplicasReady", "0/1; engines are starting"),
                         cond("Degraded", "False", "AsExpected"))  # fmt: skip
    assert [n.reason for n in condition_events(crashing, between)] == ["NoReplicasReady"]


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


def test_each_distinct_failure_is_one_warning_and_retries_are_none():
    """A failure's message is its identity: the same failure retried says nothing more, a
    different one (a new server message, another invalid field) is a new Warning."""
    ok = conditions(cond("Ready", "False", "NoReplicasReady", "0/1"))
    failed = conditions(cond("Ready", "Unknown", "ApplyFailed", "could not apply: 503 busy"),
                        cond("Progressing", "Unknown", "ApplyFailed", "could not apply: 503 busy"))
    assert condition_events(ok, failed) == [
        EventNote("Warning", "ApplyFailed", "Ready is Unknown: could not apply: 503 busy")]
    assert condition_events(failed, copy.deepcopy(failed)) == []
    other = copy.deepcopy(failed)
    for item in other["conditions"]:
        item["message"] = "could not apply (TimeoutError): no answer"
    assert [(n.type, n.reason) for n in condition_events(failed, other)] == [
        ("Warning", "ApplyFailed")]
    forbidden = conditions(cond("Ready", "False", "Forbidden", "quota"),
                           cond("Degraded", "True", "Forbidden", "quota"))  # fmt: skip
    assert condition_events(ok, forbidden) == [
        EventNote("Warning", "Forbidden", "Ready is False: quota")]
    invalid = conditions(cond("Ready", "False", "InvalidSpec", "spec.a: bad"))
    worse = conditions(cond("Ready", "False", "InvalidSpec", "spec.b: bad"))
    assert [n.message for n in condition_events(invalid, worse)] == ["Ready is False: spec.b: bad"]


def test_long_messages_are_cut_to_1024_bytes():
    new = conditions(cond("Ready", "False", "InvalidSpec", "é" * 5000))
    message = condition_events(None, new)[0].message
    assert len(message.encode()) <= 1024 and len(message.encode()) > 1000


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


DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_event_bodies_pass_the_real_schema(version):
    note = EventNote("Warning", "InvalidSpec", "Ready is False: bad")
    event = event_body(live_body(), note, NOW, "metroline-operator-7d9f-abcde", "18a2b3c4d5e6f000")
    assert kubernetes_validate.validate(event, version, strict=True)
    assert event["involvedObject"] == {
        "apiVersion": c.API_VERSION, "kind": c.KIND, "name": "llama", "namespace": NS,
        "uid": "uid-llama", "resourceVersion": "1",
    }  # fmt: skip
    assert event["metadata"] == {"name": "llama.18a2b3c4d5e6f000", "namespace": NS}
    assert (event["type"], event["reason"], event["count"]) == ("Warning", "InvalidSpec", 1)


def test_event_names_fit_a_dns_subdomain_for_any_owner_name():
    for owner in ("llama", "a" * 253, "x-" * 120 + "y", "a.b-" * 60):
        name = event_name(owner, "18a2b3c4d5e6f0001")
        assert len(name) <= 253 and DNS_SUBDOMAIN.fullmatch(name), name
        assert name.endswith(".18a2b3c4d5e6f0001")


# Over HTTP, with the real operator.


def ours(cluster: Cluster, name: str = "llama") -> list[dict[str, Any]]:
    """The operator's Events about ``name``, oldest first."""
    found = [
        obj.raw for (resource, _, _), obj in list(cluster.emulator.objects.items())
        if resource == EVENTS and not obj.deleted
        and obj.raw["involvedObject"]["name"] == name
        and obj.raw["source"]["component"] == c.FIELD_MANAGER
    ]  # fmt: skip
    return sorted(found, key=lambda event: event["metadata"]["name"])


def story(cluster: Cluster) -> Counter[tuple[str, str, str]]:
    return Counter((e["type"], e["reason"], e["message"]) for e in ours(cluster))


async def settle(controller) -> None:
    """Let the operator's queued Events reach the API server."""
    await asyncio.sleep(0.3)
    await asyncio.wrap_future(
        asyncio.run_coroutine_threadsafe(controller.events.idle(), controller_loop(controller))
    )


def controller_loop(controller) -> asyncio.AbstractEventLoop:
    assert controller.events._task is not None
    return controller.events._task.get_loop()


CREATED = {
    ("Normal", "Created", "created Deployment llama"),
    ("Normal", "Created", "created Service llama"),
    ("Normal", "Created", "created PodDisruptionBudget llama"),
}


@pytest.mark.asyncio
async def test_the_operator_records_writes_and_transitions_once(
    cluster, fake_engine, tmp_path, monkeypatch
):
    async with run_operator(cluster, fake_engine, tmp_path, monkeypatch) as operator:
        await create(cluster, llmd_body(replicas=2))
        await cluster.wait_for(lambda: set(story(cluster)) >= CREATED)
        await play_deployment_controller(cluster, ready=2)
        await cluster.wait_for(lambda: status(cluster).get("phase") == "Ready")
        await cluster.wait_for(lambda: any(r == "RolloutComplete" for _, r, _ in story(cluster)))
        await settle(operator)
        events = story(cluster)
        assert all(count == 1 for count in events.values()), events
        assert all(e["count"] == 1 for e in ours(cluster))
        # Which intermediate states the operator saw depends on timing; these it always sees.
        assert {"Created", "AllReplicasReady", "RolloutComplete"} <= {r for _, r, _ in events}
        assert all(kind == "Normal" for kind, _, _ in events), events
        # Resyncs and unrelated watch events change nothing: no new events.
        await cluster.call("PATCH", cluster.path(LLMD, "llama"),
                           {"metadata": {"labels": {"team": "ml"}}})  # fmt: skip
        await settle(operator)
        assert story(cluster) == events
    # A restarted operator starts with an empty cache: it re-applies what exists, which is not
    # news (the API server answers 200, not 201).
    async with run_operator(cluster, fake_engine, tmp_path, monkeypatch) as operator:
        await cluster.wait_for(lambda: len(cluster.requests_to("PATCH", "/deployments/llama")) > 1
                               or operator.cache.child(("ml", "llama"), "Deployment"))
        await asyncio.sleep(0.5)
        await settle(operator)
        assert story(cluster) == events
        # Scaling to 1 deletes the PDB and updates the Deployment.
        await patch_spec(cluster, {"replicas": 1})
        deleted = ("Normal", "Deleted", "deleted PodDisruptionBudget llama (replicas < 2)")
        await cluster.wait_for(lambda: deleted in story(cluster))
        assert ("Normal", "Updated", "updated Deployment llama") in story(cluster)


@pytest.mark.asyncio
async def test_an_invalid_spec_is_one_warning(cluster, operator):
    await create(cluster, llmd_body(engine={"tensorParallelSize": 2,
                                            "extraArgs": ["--port", "9000"]}))  # fmt: skip
    await cluster.wait_for(lambda: status(cluster).get("phase") == "Failed")
    await cluster.wait_for(lambda: ours(cluster))
    await settle(operator)
    events = ours(cluster)
    assert len(events) == 1 and events[0]["type"] == "Warning", events
    assert events[0]["reason"] == "InvalidSpec" and "--port" in events[0]["message"]


@pytest.mark.asyncio
async def test_a_refused_event_does_not_stop_or_repeat_reconciling(cluster, operator, caplog):
    caplog.set_level(logging.INFO, logger="metroline.operator")
    cluster.emulator.fail("POST", "/events$", 403, times=1000)
    await create(cluster, llmd_body())
    await cluster.wait_for(lambda: status(cluster).get("phase") == "Pending")
    await play_deployment_controller(cluster, ready=1)
    await cluster.wait_for(lambda: status(cluster).get("phase") == "Ready")
    await settle(operator)
    assert ours(cluster) == []
    assert any("could not record event" in r.getMessage() for r in caplog.records)
    assert not any("reconcile ml/llama failed" in r.getMessage() for r in caplog.records)
    # Each child was applied once: no reconcile failed and retried over a refused Event.
    for child in ("/deployments/llama", "/services/llama"):
        applies = [r for r in cluster.requests_to("PATCH", child) if r.url.path.endswith(child)]
        assert len(applies) == 1, child
