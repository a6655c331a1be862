"""Every reconcile outcome is in status: a child the API server refuses as invalid (400, 422,
500 "field not declared in schema") is InvalidSpec and not retried until the spec changes; 403
is Forbidden and 5xx or a timeout is ApplyFailed (Ready=Unknown), both retried with backoff;
status is written although the apply failed, with observedGeneration; one Event per distinct
failure, not one per retry."""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any

import pytest

from metroline.operator.config import OperatorConfig
from metroline.operator.controller import Controller
from metroline.operator.events import EventNote
from metroline.operator.kube import ApiError

from .conftest import DEPLOYMENTS, LLMD, NS, PDBS, Cluster, live_body, llmd_body
from .test_events import ours
from .test_operator_flow import create, patch_spec, status

KEY = (NS, "llama")
UNDECLARED = ("failed to create typed patch object (ml/llama; apps/v1, Kind=Deployment): "
              ".spec.template.spec.affinity.nodeAffinity.wrong: field not declared in schema")
RBAC = ('deployments.apps "llama" is forbidden: User "system:serviceaccount:metroline-system:'
        'metroline-operator" cannot patch resource "deployments" in API group "apps" in the '
        'namespace "ml"')
RBAC_DELETE = ('poddisruptionbudgets.policy "llama" is forbidden: User "system:serviceaccount:'
               'metroline-system:metroline-operator" cannot delete resource '
               '"poddisruptionbudgets" in API group "policy" in the namespace "ml"')


# The controller alone, against a fake API client: exactly what one reconcile does.


class FakeApi:
    """Answers applies with ``fail`` while it is set; keeps the status patches."""

    def __init__(self) -> None:
        self.fail: ApiError | None = None
        self.fail_delete: ApiError | None = None
        self.applies: list[dict[str, Any]] = []
        self.statuses: list[dict[str, Any]] = []
        self.body = live_body()

    async def apply(self, obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        self.applies.append(obj)
        if self.fail is not None:
            raise self.fail
        live = copy.deepcopy(obj)
        live["metadata"]["resourceVersion"] = str(len(self.applies))
        return live, True

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict:
        self.statuses.append(copy.deepcopy(status))
        self.body = {**self.body, "status": {**(self.body.get("status") or {}), **status}}
        self.body["metadata"] = {**self.body["metadata"],
                                 "resourceVersion": str(100 + len(self.statuses))}
        return copy.deepcopy(self.body)

    async def delete(self, *_: Any) -> None:
        if self.fail_delete is not None:
            raise self.fail_delete


class Notes:
    def __init__(self) -> None:
        self.notes: list[EventNote] = []

    def record(self, _: Any, note: EventNote) -> None:
        self.notes.append(note)


def controller_with(api: FakeApi, body: dict[str, Any] | None = None) -> tuple[Controller, Notes]:
    controller = Controller(api, OperatorConfig(engine_image="e:1"),  # type: ignore[arg-type]
                            clock=lambda: "2026-01-01T00:00:00Z")  # fmt: skip
    notes = Notes()
    controller.events = notes  # type: ignore[assignment]
    api.body = body or api.body
    controller.cache.put_llmd(api.body)
    return controller, notes


def conditions_of(status: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    return {c["type"]: (c["status"], c["reason"], c["message"]) for c in status["conditions"]}


async def reconcile(controller: Controller, api: FakeApi) -> ApiError | None:
    """One reconcile as the worker runs it; the error it raised (a retry), or None."""
    controller.cache.put_llmd(api.body)
    try:
        await controller.reconcile(KEY)
    except ApiError as error:
        return error
    return None


SPEC_PROBLEMS = [
    ApiError(500, "Error", UNDECLARED),
    ApiError(400, "BadRequest", UNDECLARED.replace("failed", "failed (newer servers)")),
    ApiError(422, "Invalid", 'Deployment.apps "llama" is invalid: spec.template.spec.affinity.'
                             "nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution."
                             "nodeSelectorTerms[0].matchExpressions[0].values: Required value"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize("error", SPEC_PROBLEMS, ids=["500-undeclared", "400", "422"])
async def test_a_spec_the_server_refuses_is_invalid_spec_until_the_spec_changes(error):
    api = FakeApi()
    api.fail = error
    controller, notes = controller_with(api)
    assert await reconcile(controller, api) is None  # no retry
    [written] = api.statuses
    ready = conditions_of(written)["Ready"]
    assert ready[:2] == ("False", "InvalidSpec")
    assert ready[2] == f"the API server refused the Service: {error.message}"
    assert written["phase"] == "Failed" and written["observedGeneration"] == 1
    assert [n.reason for n in notes.notes] == ["InvalidSpec"]
    # Watch events of the same generation neither apply again nor write again.
    for _ in range(3):
        assert await reconcile(controller, api) is None
    assert len(api.applies) == 1 and len(api.statuses) == 1 and len(notes.notes) == 1
    # A new generation is judged again.
    api.fail = None
    api.body["metadata"]["generation"] = 2
    assert await reconcile(controller, api) is None
    assert len(api.applies) == 1 + 2  # Service and Deployment (replicas 1: no PDB)
    assert conditions_of(api.statuses[-1])["Ready"][1] == "NoReplicasReady"
    assert api.statuses[-1]["observedGeneration"] == 2


FAILURES = [
    (ApiError(403, "Forbidden", RBAC), "Forbidden"),
    (ApiError(500, "InternalError", "etcdserver: request timed out"), "ApplyFailed"),
    (ApiError(503, "ServiceUnavailable", "the server is currently unable to handle the request"),
     "ApplyFailed"),
    (ApiError(504, "Timeout", "Timeout: request did not complete within requested timeout"),
     "ApplyFailed"),
    (ApiError(0, "ServerTimeoutError", "Timeout on reading data from socket"), "ApplyFailed"),
    (ApiError(0, "ClientConnectorError", "Cannot connect to host 10.96.0.1:443"), "ApplyFailed"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("error", "reason"), FAILURES,
                         ids=["403", "500", "503", "504", "timeout", "refused"])
async def test_other_failures_are_in_status_within_one_reconcile_and_retried(error, reason):
    api = FakeApi()
    api.fail = error
    controller, notes = controller_with(api)
    assert await reconcile(controller, api) is error  # the worker backs off and retries
    [written] = api.statuses  # status written although the apply failed
    conds = conditions_of(written)
    assert written["observedGeneration"] == 1
    assert all(c["observedGeneration"] == 1 for c in written["conditions"])
    assert error.message in conds["Ready"][2] and "Service" in conds["Ready"][2]
    if reason == "Forbidden":
        assert conds["Ready"][:2] == ("False", "Forbidden")
        assert conds["Degraded"][:2] == ("True", "Forbidden")
        assert conds["Progressing"][:2] == ("False", "Forbidden")
        assert written["phase"] == "Degraded"
    else:
        assert conds["Ready"][:2] == ("Unknown", "ApplyFailed")
        assert conds["Progressing"][:2] == ("Unknown", "ApplyFailed")
        assert conds["Degraded"][:2] == ("False", "AsExpected")
        assert written["phase"] == "Pending"
    assert [(n.type, n.reason) for n in notes.notes] == [("Warning", reason)]
    # Retries of the same failure: no new status write, no new Event.
    for _ in range(3):
        assert await reconcile(controller, api) is error
    assert len(api.statuses) == 1 and len(notes.notes) == 1
    # A different failure is news: one more Event.
    api.fail = ApiError(error.status, error.reason, error.message + " (again, otherwise)")
    assert await reconcile(controller, api) is api.fail
    assert len(api.statuses) == 2 and [n.reason for n in notes.notes] == [reason, reason]
    # Recovery: the apply goes through, status says what runs.
    api.fail = None
    assert await reconcile(controller, api) is None
    assert conditions_of(api.statuses[-1])["Ready"][:2] == ("False", "NoReplicasReady")


@pytest.mark.asyncio
@pytest.mark.parametrize("code", [409, 429])
async def test_conflicts_and_throttling_are_retried_without_a_word_in_status(code):
    api = FakeApi()
    api.fail = ApiError(code, "TooManyRequests", "slow down", retry_after=1.0)
    controller, notes = controller_with(api)
    assert await reconcile(controller, api) is api.fail
    assert api.statuses == [] and notes.notes == []


@pytest.mark.asyncio
async def test_a_stale_status_is_replaced_when_the_apply_of_a_new_spec_fails():
    """An object that was Ready at generation 1; generation 2 cannot be applied."""
    api = FakeApi()
    controller, _ = controller_with(api)
    assert await reconcile(controller, api) is None
    ready_dep = {**api.applies[1], "status": {"observedGeneration": 1, "replicas": 1,
                                              "updatedReplicas": 1, "readyReplicas": 1}}
    ready_dep["metadata"] = {**ready_dep["metadata"], "generation": 1, "resourceVersion": "50"}
    controller.cache.put_child(ready_dep, "Deployment")
    assert await reconcile(controller, api) is None
    assert api.statuses[-1]["phase"] == "Ready"
    api.body["spec"] = {**api.body["spec"], "engine": {"tensorParallelSize": 4}}
    api.body["metadata"]["generation"] = 2
    api.fail = ApiError(500, "InternalError", "etcdserver: leader changed")
    assert await reconcile(controller, api) is api.fail
    written = api.statuses[-1]
    conds = conditions_of(written)
    assert written["observedGeneration"] == 2
    assert conds["Ready"][:2] == ("Unknown", "ApplyFailed")
    assert "etcdserver: leader changed" in conds["Ready"][2]
    assert written["phase"] == "Progressing"  # old pods serve; the new spec is not rolled out
    assert written["readyReplicas"] == 1
    # Forbidden while old pods serve: they still do (Ready=True), but Degraded says why not.
    api.fail = ApiError(403, "Forbidden", RBAC)
    assert await reconcile(controller, api) is api.fail
    conds = conditions_of(api.statuses[-1])
    assert conds["Ready"][:2] == ("True", "AllReplicasReady")
    assert conds["Degraded"][:2] == ("True", "Forbidden")
    assert conds["Progressing"][:2] == ("False", "Forbidden")


@pytest.mark.asyncio
async def test_a_failed_delete_of_the_pdb_is_in_status_too():
    api = FakeApi()
    controller, _ = controller_with(api)
    controller.cache.put_child({"metadata": {"name": "llama", "namespace": NS, "ownerReferences": [
        {"apiVersion": "serving.metroline.dev/v1alpha1", "kind": "LLMDeployment", "name": "llama",
         "controller": True}]}}, "PodDisruptionBudget")  # fmt: skip
    api.fail_delete = ApiError(403, "Forbidden", RBAC_DELETE)
    assert await reconcile(controller, api) is api.fail_delete
    ready = conditions_of(api.statuses[-1])["Ready"]
    assert ready[:2] == ("False", "Forbidden") and RBAC_DELETE in ready[2]
    assert "delete of the PodDisruptionBudget" in ready[2]


# The real operator over HTTP.


def status_writes(cluster: Cluster) -> list[dict[str, Any]]:
    """The operator's status patches, oldest first."""
    requests = cluster.requests_to("PATCH", "/llmdeployments/llama/status")
    return [(r.data if r.data is not None else json.loads(r.text))["status"] for r in requests]


def conditions(cluster: Cluster) -> dict[str, tuple[str, str, str]]:
    return conditions_of(status(cluster)) if status(cluster).get("conditions") else {}


async def drain_events(operator: Controller) -> None:
    assert operator.events._task is not None
    loop = operator.events._task.get_loop()
    await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(operator.events.idle(), loop))


@pytest.mark.asyncio
async def test_an_ssa_500_for_an_undeclared_field_is_invalid_spec(cluster, operator):
    """What a real server answers for an undeclared field: InvalidSpec, no retry loop."""
    cluster.emulator.fail("PATCH", "/deployments/llama$", 500, times=1000, message=UNDECLARED,
                          reason=None)  # fmt: skip
    await create(cluster, llmd_body())
    await cluster.wait_for(lambda: status(cluster).get("phase") == "Failed")
    ready = conditions(cluster)["Ready"]
    assert ready[:2] == ("False", "InvalidSpec") and "field not declared in schema" in ready[2]
    assert status(cluster)["observedGeneration"] == 1
    # Another watch event of the same generation: a reconcile, but no apply and no retry.
    seen = operator.reconciled[(NS, "llama")]
    await cluster.call("PATCH", cluster.path(LLMD, "llama"), {"metadata": {"labels": {"a": "b"}}})
    await cluster.wait_for(lambda: operator.reconciled[(NS, "llama")] > seen)
    assert len([r for r in cluster.requests_to("PATCH", "/deployments/llama")]) == 1
    assert operator.failures == {}
    cluster.emulator.clear_faults()
    await patch_spec(cluster, {"replicas": 2})
    await cluster.wait_for(lambda: cluster.get(DEPLOYMENTS, "llama"))
    await cluster.wait_for(lambda: status(cluster).get("observedGeneration") == 2
                           and status(cluster)["phase"] == "Pending")  # fmt: skip


@pytest.mark.asyncio
async def test_an_undeclared_field_in_an_opaque_place_ends_as_invalid_spec(cluster, operator):
    """No injected fault: the emulator's own schema answers the apply (or, once the CRD types
    ``affinity``, the operator's checks refuse the spec first); either way it names the field."""
    await create(cluster, llmd_body(affinity={"nodeAffinity": {"wrong": True}}))
    await cluster.wait_for(lambda: status(cluster).get("phase") == "Failed")
    ready = conditions(cluster)["Ready"]
    assert ready[:2] == ("False", "InvalidSpec") and "wrong" in ready[2]
    assert cluster.get(DEPLOYMENTS, "llama") is None
    assert operator.failures == {}


@pytest.mark.asyncio
async def test_an_ssa_500_is_apply_failed_within_one_reconcile_and_retried(cluster, operator):
    cluster.emulator.fail("PATCH", "/services/llama$", 500, times=1000,
                          message="etcdserver: request timed out", reason="InternalError")
    await create(cluster, llmd_body())
    await cluster.wait_for(lambda: status_writes(cluster))
    first = conditions_of(status_writes(cluster)[0])  # the first reconcile wrote it
    assert first["Ready"][:2] == ("Unknown", "ApplyFailed")
    assert "etcdserver: request timed out" in first["Ready"][2]
    assert all(c["observedGeneration"] == 1 for c in status_writes(cluster)[0]["conditions"])
    assert status_writes(cluster)[0]["observedGeneration"] == 1
    # Retried with backoff; status is not rewritten per retry, one Event for the failure.
    await cluster.wait_for(lambda: operator.failures.get((NS, "llama"), 0) >= 3)
    assert len(status_writes(cluster)) == 1
    await drain_events(operator)
    warnings = [e for e in ours(cluster) if e["type"] == "Warning"]
    assert [(e["reason"], e["count"]) for e in warnings] == [("ApplyFailed", 1)]
    cluster.emulator.clear_faults()
    await cluster.wait_for(lambda: cluster.get(DEPLOYMENTS, "llama"))
    await cluster.wait_for(lambda: conditions(cluster).get("Ready", ("",))[0] == "False")
    await cluster.wait_for(lambda: not operator.failures)


@pytest.mark.asyncio
async def test_a_403_is_forbidden_and_retried(cluster, operator):
    await create(cluster, llmd_body(replicas=2))
    await cluster.wait_for(lambda: cluster.get(PDBS, "llama"))
    await cluster.wait_for(lambda: status(cluster).get("observedGeneration") == 1)
    cluster.emulator.fail("PATCH", "/deployments/llama$", 403, times=1000, message=RBAC,
                          reason="Forbidden")  # fmt: skip
    await patch_spec(cluster, {"engine": {"tensorParallelSize": 4}})
    await cluster.wait_for(lambda: status(cluster).get("observedGeneration") == 2)
    conds = conditions(cluster)
    assert conds["Ready"][:2] == ("False", "Forbidden") and RBAC in conds["Ready"][2]
    assert conds["Degraded"][:2] == ("True", "Forbidden")
    assert status(cluster)["phase"] == "Degraded"
    await cluster.wait_for(lambda: operator.failures.get((NS, "llama"), 0) >= 2)
    cluster.emulator.clear_faults()
    await cluster.wait_for(lambda: conditions(cluster)["Degraded"][1] == "AsExpected")
    dep = cluster.get(DEPLOYMENTS, "llama")
    assert dep["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"] == "4"
    await drain_events(operator)
    forbidden = [e for e in ours(cluster) if e["reason"] == "Forbidden"]
    assert len(forbidden) == 1 and forbidden[0]["type"] == "Warning"
