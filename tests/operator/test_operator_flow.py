"""End to end over HTTP: the kopf operator against KMock's Kubernetes emulator.

The tests play the parts of the user (kubectl) and of the controllers the emulator lacks (the
Deployment controller and the kubelet: they write Deployment status and pods).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from metroline.operator import constants as c

from .conftest import DEPLOYMENTS, LLMD, NS, PDBS, PODS, SERVICES, Cluster, llmd_body

pytestmark = pytest.mark.asyncio


def engine(dep: dict[str, Any]) -> dict[str, Any]:
    return dep["spec"]["template"]["spec"]["containers"][0]


def gpus(dep: dict[str, Any] | None) -> str | None:
    return None if dep is None else engine(dep)["resources"]["limits"]["nvidia.com/gpu"]


def status(cluster: Cluster, name: str = "llama") -> dict[str, Any]:
    return (cluster.get(LLMD, name) or {}).get("status") or {}


def conditions(cluster: Cluster, name: str = "llama") -> dict[str, tuple[str, str, str]]:
    return {
        cond["type"]: (cond["status"], cond["reason"], cond["message"])
        for cond in status(cluster, name).get("conditions", [])
    }


async def create(cluster: Cluster, body: dict[str, Any]) -> dict[str, Any]:
    return await cluster.call("POST", cluster.path(LLMD), body, "application/json")


async def patch_spec(cluster: Cluster, spec: dict[str, Any], name: str = "llama") -> None:
    await cluster.call("PATCH", cluster.path(LLMD, name), {"spec": spec})


async def play_deployment_controller(
    cluster: Cluster, ready: int, pod_status: dict[str, Any] | None = None
) -> None:
    """Write what the Deployment controller and kubelet would: status and ``ready`` pods."""
    dep = cluster.get(DEPLOYMENTS, "llama")
    assert dep is not None
    desired = dep["spec"]["replicas"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    await cluster.call("PATCH", cluster.path(DEPLOYMENTS, "llama", "status"), {"status": {
        "observedGeneration": dep["metadata"]["generation"], "replicas": desired,
        "updatedReplicas": desired, "readyReplicas": ready, "availableReplicas": ready,
    }})
    for index in range(desired):
        is_ready = "True" if index < ready else "False"
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"llama-5d8f-{index}", "namespace": NS, "labels": labels},
            "spec": dep["spec"]["template"]["spec"],
            "status": pod_status or {
                "phase": "Running", "podIP": "127.0.0.1",
                "conditions": [{"type": "Ready", "status": is_ready}],
            },
        }
        if cluster.get(PODS, pod["metadata"]["name"]) is None:
            await cluster.call("POST", cluster.path(PODS), pod, "application/json")
        else:
            path = cluster.path(PODS, pod["metadata"]["name"], "status")
            await cluster.call("PATCH", path, {"status": pod["status"]})


async def test_create_renders_children_sized_by_tp(cluster, operator):
    created = await create(cluster, llmd_body(replicas=2))
    dep = await cluster.wait_for(lambda: cluster.get(DEPLOYMENTS, "llama"))
    svc = await cluster.wait_for(lambda: cluster.get(SERVICES, "llama"))
    pdb = await cluster.wait_for(lambda: cluster.get(PDBS, "llama"))
    assert gpus(dep) == "2"
    assert engine(dep)["args"][engine(dep)["args"].index("--tensor-parallel-size") + 1] == "2"
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http",
                                     "protocol": "TCP", "appProtocol": "http"}]
    uid = created["metadata"]["uid"]
    for child in (dep, svc, pdb):
        assert child["metadata"]["ownerReferences"] == [{
            "apiVersion": c.API_VERSION, "kind": c.KIND, "name": "llama", "uid": uid,
            "controller": True, "blockOwnerDeletion": True,
        }]
    await cluster.wait_for(lambda: status(cluster).get("observedGeneration") == 1)
    got = status(cluster)
    assert got["phase"] == "Pending"
    assert got["endpoint"] == f"http://llama.{NS}.svc:8000/v1"
    assert got["selector"] == "app.kubernetes.io/instance=llama,app.kubernetes.io/name=metroline"
    assert set(conditions(cluster)) == {"Ready", "Progressing", "Degraded"}
    # Children go through server-side apply under one field manager; the spec is never written.
    applies = cluster.requests_to("PATCH", "/deployments/llama")
    assert applies and all(
        r.params == {"fieldManager": c.FIELD_MANAGER, "force": "true"}
        and r.headers["Content-Type"] == "application/apply-patch+yaml" for r in applies
    )
    writes = [r for r in cluster.emulator if "/llmdeployments/llama" in r.url.path
              and r.method.value in ("PATCH", "PUT") and r.subresource != "status"]
    assert writes == []


async def test_changing_tp_rolls_the_deployment(cluster, operator):
    await create(cluster, llmd_body())
    await cluster.wait_for(lambda: gpus(cluster.get(DEPLOYMENTS, "llama")) == "2")
    await patch_spec(cluster, {"engine": {"tensorParallelSize": 4}, "image": "registry.test/e:2"})
    dep = await cluster.wait_for(
        lambda: (d := cluster.get(DEPLOYMENTS, "llama")) and gpus(d) == "4" and d
    )
    assert dep["metadata"]["generation"] == 2  # a new template: the Deployment rolls
    assert engine(dep)["image"] == "registry.test/e:2"
    assert "4" in engine(dep)["args"]
    assert dep["spec"]["template"]["spec"]["volumes"][0]["emptyDir"]["sizeLimit"] == "8Gi"
    await cluster.wait_for(lambda: status(cluster).get("observedGeneration") == 2)
    assert conditions(cluster)["Progressing"][:2] == ("True", "RollingOut")


async def test_status_follows_ready_pods_and_kv_metrics(cluster, operator, fake_engine):
    await create(cluster, llmd_body(replicas=2))
    await cluster.wait_for(lambda: cluster.get(DEPLOYMENTS, "llama"))
    await play_deployment_controller(cluster, ready=1)
    await cluster.wait_for(lambda: status(cluster).get("readyReplicas") == 1)
    assert conditions(cluster)["Ready"][:2] == ("True", "SomeReplicasReady")
    assert conditions(cluster)["Progressing"][:2] == ("True", "WaitingForReady")
    assert status(cluster)["phase"] == "Ready"  # serving, while the second pod still loads
    await play_deployment_controller(cluster, ready=2)
    await cluster.wait_for(lambda: status(cluster).get("readyReplicas") == 2)
    got = conditions(cluster)
    assert got["Ready"][:2] == ("True", "AllReplicasReady")
    assert got["Progressing"][:2] == ("False", "RolloutComplete")
    assert got["Degraded"][:2] == ("False", "AsExpected")
    await cluster.wait_for(lambda: status(cluster).get("kvCacheUtilization") == 0.42)
    fake_engine.kv = 0.9
    await cluster.wait_for(lambda: status(cluster).get("kvCacheUtilization") == 0.9)


async def test_crashing_pods_show_as_degraded_with_their_reason(cluster, operator):
    await create(cluster, llmd_body())
    await cluster.wait_for(lambda: cluster.get(DEPLOYMENTS, "llama"))
    crash = {
        "phase": "Running", "podIP": "127.0.0.1",
        "conditions": [{"type": "Ready", "status": "False"}],
        "containerStatuses": [{
            "name": "engine", "ready": False, "restartCount": 4,
            "state": {"waiting": {"reason": "CrashLoopBackOff",
                                  "message": "back-off 1m20s restarting failed container"}},
            "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}},
        }],
    }
    await play_deployment_controller(cluster, ready=0, pod_status=crash)
    await cluster.wait_for(lambda: status(cluster).get("phase") == "Degraded")
    degraded = conditions(cluster)["Degraded"]
    assert degraded[:2] == ("True", "CrashLoopBackOff")
    assert "llama-5d8f-0" in degraded[2] and "OOMKilled" in degraded[2]
    assert conditions(cluster)["Ready"][:2] == ("False", "CrashLoopBackOff")


async def test_invalid_spec_reports_invalid_spec_and_creates_nothing(cluster, operator):
    bad = llmd_body(engine={"tensorParallelSize": 2, "extraArgs": ["--port", "9000"]})
    await create(cluster, bad)
    await cluster.wait_for(lambda: status(cluster).get("phase") == "Failed")
    ready = conditions(cluster)["Ready"]
    assert ready[:2] == ("False", "InvalidSpec") and "--port" in ready[2]
    assert cluster.get(DEPLOYMENTS, "llama") is None and cluster.get(SERVICES, "llama") is None
    writes = len(cluster.requests_to("PATCH", "/llmdeployments/llama/status"))
    assert writes >= 1
    await asyncio.sleep(0.5)  # backoff here is 0.05 s: a retry loop would write again
    assert len(cluster.requests_to("PATCH", "/llmdeployments/llama/status")) == writes
    assert operator.failures == {} and not cluster.requests_to("PATCH", "/deployments/")
    await patch_spec(cluster, {"engine": {"extraArgs": ["--enforce-eager"]}})
    dep = await cluster.wait_for(lambda: cluster.get(DEPLOYMENTS, "llama"))
    assert engine(dep)["args"][-1] == "--enforce-eager"
    await cluster.wait_for(lambda: status(cluster).get("observedGeneration") == 2)
    assert status(cluster)["phase"] == "Pending"


# Well-formed, but the API server's validation refuses it: "In" needs values.
REFUSED_AFFINITY = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
    "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "In", "values": []}]}],
}}}


async def test_a_child_refused_by_the_api_server_is_invalid_spec_without_retries(cluster, operator):
    cluster.emulator.fail("PATCH", "/deployments/llama$", 422, times=1000, reason="Invalid",
                          message="spec.template.spec.affinity.nodeAffinity.requiredDuring"
                                  "SchedulingIgnoredDuringExecution.nodeSelectorTerms[0]."
                                  "matchExpressions[0].values: Required value")  # fmt: skip
    await create(cluster, llmd_body(affinity=REFUSED_AFFINITY))
    await cluster.wait_for(lambda: status(cluster).get("phase") == "Failed")
    ready = conditions(cluster)["Ready"]
    assert ready[:2] == ("False", "InvalidSpec") and "refused the Deployment" in ready[2]
    await asyncio.sleep(0.5)
    assert len(cluster.requests_to("PATCH", "/deployments/llama")) == 1  # no retry loop
    assert operator.failures == {}
    cluster.emulator.clear_faults()
    await patch_spec(cluster, {"affinity": None})  # the user fixes the spec
    await cluster.wait_for(lambda: cluster.get(DEPLOYMENTS, "llama"))
    await cluster.wait_for(lambda: status(cluster).get("phase") == "Pending")


async def test_edited_or_deleted_children_are_repaired(cluster, operator):
    await create(cluster, llmd_body())
    await cluster.wait_for(lambda: cluster.get(SERVICES, "llama"))
    await cluster.call("DELETE", cluster.path(SERVICES, "llama"))
    await cluster.wait_for(lambda: cluster.get(SERVICES, "llama"))
    await cluster.call("PATCH", cluster.path(DEPLOYMENTS, "llama"), {"spec": {"replicas": 5}})
    await cluster.wait_for(lambda: cluster.get(DEPLOYMENTS, "llama")["spec"]["replicas"] == 1)


async def test_scaling_down_removes_the_pdb_and_deletion_cascades(cluster, operator):
    await create(cluster, llmd_body(replicas=3))
    await cluster.wait_for(lambda: cluster.get(PDBS, "llama"))
    await patch_spec(cluster, {"replicas": 1})  # what `kubectl scale` does via /scale
    await cluster.wait_for(lambda: cluster.get(PDBS, "llama") is None)
    assert cluster.get(DEPLOYMENTS, "llama")["spec"]["replicas"] == 1
    await cluster.call("DELETE", cluster.path(LLMD, "llama"))
    await cluster.wait_for(lambda: cluster.get(DEPLOYMENTS, "llama") is None)
    assert cluster.get(SERVICES, "llama") is None


async def test_api_errors_are_retried_with_backoff_not_hot_loops(cluster, operator):
    await create(cluster, llmd_body())
    await cluster.wait_for(lambda: status(cluster).get("observedGeneration") == 1)
    before = len(cluster.requests_to("PATCH", "/deployments/llama"))
    cluster.emulator.fail("PATCH", "/deployments/llama$", 500, times=1000)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await patch_spec(cluster, {"engine": {"tensorParallelSize": 4}})

    def tries_and_failures() -> tuple[int, int]:
        tries = len(cluster.requests_to("PATCH", "/deployments/llama")) - before
        return tries, operator.failures.get((NS, "llama"), 0)

    # Wait for a few failed tries, read at a moment the operator has counted every one (a try
    # still in flight is already in the API server's log but not yet among its failures).
    failed, _ = await cluster.wait_for(
        lambda: (counts := tries_and_failures())[0] == counts[1] >= 3 and counts
    )
    elapsed = loop.time() - started
    # Backoff 0.05 s doubling to a 0.4 s cap, each delay at least 80% of that (jitter 0.2): no
    # more tries than that schedule fits into the time that passed (a slow machine only makes
    # fewer), never a hot loop.
    delays, waited = [], 0.0
    while waited <= elapsed:
        delays.append(0.8 * min(0.05 * 2 ** len(delays), 0.4))
        waited += delays[-1]
    assert 3 <= failed <= len(delays) + 1, (failed, elapsed)
    # Status says so meanwhile, for the new generation (written once, not per retry).
    ready = conditions(cluster)["Ready"]
    assert ready[:2] == ("Unknown", "ApplyFailed") and "injected 500" in ready[2]
    assert status(cluster)["observedGeneration"] == 2
    cluster.emulator.clear_faults()
    await cluster.wait_for(lambda: gpus(cluster.get(DEPLOYMENTS, "llama")) == "4")
    await cluster.wait_for(lambda: not operator.failures)


@pytest.mark.parametrize("code", [409, 429, 503])
async def test_retry_after_and_conflicts_are_honoured(cluster, operator, code):
    await create(cluster, llmd_body())
    await cluster.wait_for(lambda: status(cluster).get("observedGeneration") == 1)
    cluster.emulator.fail("PATCH", "/deployments/llama$", code, times=1, retry_after=0.5)
    started = time.monotonic()
    await patch_spec(cluster, {"engine": {"tensorParallelSize": 8}})
    await cluster.wait_for(lambda: gpus(cluster.get(DEPLOYMENTS, "llama")) == "8")
    assert time.monotonic() - started >= 0.45


async def test_removing_a_spec_field_removes_it_from_the_deployment(cluster, operator):
    """The live Deployment still contains the shrunken render; the config hash says it is stale."""
    await create(cluster, llmd_body(nodeSelector={"gpu": "h100"}, podAnnotations={"team": "ml"}))
    await cluster.wait_for(lambda: cluster.get(DEPLOYMENTS, "llama"))
    await patch_spec(cluster, {"nodeSelector": None, "podAnnotations": None})
    await cluster.wait_for(lambda: status(cluster).get("observedGeneration") == 2)
    template = cluster.get(DEPLOYMENTS, "llama")["spec"]["template"]
    assert "nodeSelector" not in template["spec"]
    assert "team" not in template["metadata"]["annotations"]
