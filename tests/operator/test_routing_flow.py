"""``spec.routing`` end to end: the real operator against the emulator, with and without the
Gateway API Inference Extension's CRD installed, and the emulator answering InferencePools as
an API server with that CRD does (``emulator_crd.py``)."""

from __future__ import annotations

import json
from typing import Any

import kmock
import pytest

from metroline.operator import constants as c
from metroline.operator.routing import CRD_NOT_INSTALLED, POOL_KIND, InferencePools

from .conftest import (
    DEPLOYMENTS,
    NS,
    SERVICES,
    VERBS,
    Cluster,
    FakeClock,
    llmd_body,
    run_operator,
)
from .crd_validation import validate_against
from .emulator_crd import schemas
from .test_operator_flow import conditions, create, patch_spec, status

pytestmark = pytest.mark.asyncio

POOLS = kmock.resource("inference.networking.k8s.io", "v1", "inferencepools")
GIE_SCHEMA = schemas()["inference.networking.k8s.io/v1", POOL_KIND][1]
ROUTED = {"inferencePool": True, "endpointPicker": {"name": "llama-epp"}}
KEY = (NS, "llama")


def install_the_crd(cluster: Cluster) -> None:
    """What installing the extension's CRDs does to discovery."""
    info = kmock.ResourceInfo(kind=POOL_KIND, namespaced=True, subresources={"status"})
    info.verbs = set(VERBS)
    cluster.emulator.resources[POOLS] = info


async def apply(cluster: Cluster, obj: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    path = cluster.path(POOLS, obj["metadata"]["name"])
    headers = {"Content-Type": "application/apply-patch+yaml"}
    async with cluster.server.client.patch(
        path,
        params={"fieldManager": "test", "force": "true"},
        data=json.dumps(obj),
        headers=headers,
    ) as response:
        return response.status, await response.json()


def pool(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": POOL_KIND,
        "metadata": {"name": "p", "namespace": NS},
        "spec": {
            "selector": {"matchLabels": {"app": "x"}},
            "targetPorts": [{"number": 8000}],
            "endpointPickerRef": {"name": "epp", "port": {"number": 9002}},
            **spec,
        },
    }


async def test_the_emulator_answers_inference_pools_as_an_api_server(cluster):
    code, answer = await apply(cluster, pool())
    assert (code, answer["reason"]) == (404, "NotFound")
    assert answer["message"] == "the server could not find the requested resource"
    install_the_crd(cluster)
    code, stored = await apply(cluster, pool())
    assert code == 201
    assert stored["spec"]["appProtocol"] == "http"  # the CRD's defaults, stored
    assert stored["spec"]["endpointPickerRef"] == {
        "name": "epp",
        "port": {"number": 9002},
        "group": "",
        "kind": "Service",
        "failureMode": "FailClose",
    }
    code, answer = await apply(cluster, pool(targetPorts=[{"number": 1}, {"number": 1}]))
    assert (code, answer["reason"]) == (422, "Invalid")
    assert answer["message"] == (
        'InferencePool.inference.networking.k8s.io "p" is invalid: '
        "spec.targetPorts: port number must be unique"
    )
    code, answer = await apply(cluster, pool(endpointPickerRef={"name": "epp"}))
    assert code == 422 and "port is required when kind is 'Service'" in answer["message"]
    code, answer = await apply(cluster, pool(weight=3))
    assert code == 500 and ".spec.weight: field not declared in schema" in answer["message"]


async def test_the_operator_owns_an_inference_pool_of_the_engine_pods(
    cluster, fake_engine, tmp_path, monkeypatch
):
    install_the_crd(cluster)
    async with run_operator(cluster, fake_engine, tmp_path, monkeypatch):
        created = await create(cluster, llmd_body(routing=ROUTED))
        live = await cluster.wait_for(lambda: cluster.get(POOLS, "llama"))
        dep = await cluster.wait_for(lambda: cluster.get(DEPLOYMENTS, "llama"))
        assert validate_against(GIE_SCHEMA, live) == []
        selector = live["spec"]["selector"]["matchLabels"]
        assert selector.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        assert live["spec"]["targetPorts"] == [{"number": c.HTTP_PORT}]
        assert live["spec"]["endpointPickerRef"]["name"] == "llama-epp"
        assert [ref["uid"] for ref in live["metadata"]["ownerReferences"]] == [
            created["metadata"]["uid"]
        ]
        state = await cluster.wait_for(lambda: conditions(cluster).get("InferencePool"))
        assert state[:2] == ("True", "PoolApplied") and "restart" not in state[2]
        # Edited: repaired. The server's defaults (group "") are no drift.
        applies = len(cluster.requests_to("PATCH", "/inferencepools/llama"))
        await cluster.call(
            "PATCH", cluster.path(POOLS, "llama"), {"spec": {"targetPorts": [{"number": 9000}]}}
        )
        await cluster.wait_for(
            lambda: cluster.get(POOLS, "llama")["spec"]["targetPorts"] == [{"number": 8000}]
        )
        assert len(cluster.requests_to("PATCH", "/inferencepools/llama")) == applies + 2
        # Turned off: deleted, the condition gone, the engines untouched.
        generation = dep["metadata"]["generation"]
        await patch_spec(cluster, {"routing": {"inferencePool": False, "endpointPicker": None}})
        await cluster.wait_for(lambda: cluster.get(POOLS, "llama") is None)
        await cluster.wait_for(lambda: "InferencePool" not in conditions(cluster))
        assert cluster.get(DEPLOYMENTS, "llama")["metadata"]["generation"] == generation


async def test_a_cluster_without_the_crd_is_told_and_tried_again(
    cluster, fake_engine, tmp_path, monkeypatch
):
    clock = FakeClock()
    async with run_operator(cluster, fake_engine, tmp_path, monkeypatch) as controller:
        controller.pools = InferencePools(monotonic=clock, recheck_s=3600)
        await create(cluster, llmd_body(routing=ROUTED))
        state = await cluster.wait_for(
            lambda: (
                (s := conditions(cluster).get("InferencePool")) and s[1] == CRD_NOT_INSTALLED and s
            )
        )
        assert state[0] == "False"
        assert "could not find the requested resource" in state[2] and "install" in state[2]
        # The engines are served as ever: children applied, status about the pods only.
        assert cluster.get(DEPLOYMENTS, "llama") and cluster.get(SERVICES, "llama")
        assert conditions(cluster)["Degraded"][0] == "False"
        assert status(cluster)["phase"] == "Pending"
        assert KEY not in controller.failures  # no retry with backoff: not an error
        tries = len(cluster.requests_to("PATCH", "/inferencepools/llama"))
        assert tries == 1
        # Reconciles before the recheck do not ask again.
        done = controller.reconciled[KEY]
        await patch_spec(cluster, {"podAnnotations": {"a": "1"}})
        await cluster.wait_for(
            lambda: (
                controller.reconciled[KEY] > done
                and cluster.get(DEPLOYMENTS, "llama")["spec"]["template"]["metadata"][
                    "annotations"
                ].get("a")
            )
        )
        assert len(cluster.requests_to("PATCH", "/inferencepools/llama")) == tries
        # The CRD installed later: the first reconcile after the recheck creates the pool, and
        # the condition says the operator, which resolved its watches at start, needs a restart.
        install_the_crd(cluster)
        clock.advance(3600)
        await patch_spec(cluster, {"podAnnotations": {"a": "2"}})
        live = await cluster.wait_for(lambda: cluster.get(POOLS, "llama"))
        assert validate_against(GIE_SCHEMA, live) == []
        state = await cluster.wait_for(
            lambda: (s := conditions(cluster).get("InferencePool")) and s[0] == "True" and s
        )
        assert "restart" in state[2]
