"""Drift by meaning, not text: what the API server stores for a rendered child covers the
render, so a steady object is applied exactly once; real edits still count as drift."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from metroline.operator.checks import check_spec
from metroline.operator.drift import covers
from metroline.operator.render import render_children

from .conftest import DEPLOYMENTS, SERVICES, Cluster, live_body, llmd_body
from .emulator import builtin_schema
from .test_events import ours
from .test_operator_flow import create, status

SPEC: dict[str, Any] = {
    "resources": {"requests": {"cpu": "0.5", "memory": "1024Mi"},
                  "limits": {"cpu": "1.5", "memory": "16384Mi", "ephemeral-storage": "0.5Gi"}},
    "env": [{"name": "EMPTY", "value": ""}, {"name": "MODE", "value": "0.5"}],
    "tolerations": [{"key": "", "operator": "Exists"}],
}  # fmt: skip


def rendered_deployment(**spec: Any) -> dict[str, Any]:
    body = live_body(**spec)
    check = check_spec("llama", body["spec"])
    assert check.valid, check.problems
    return next(c for c in render_children(body, check, "e:1") if c["kind"] == "Deployment")


def stored(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` as the API server stores it, plus what it adds (defaults, status)."""
    live = builtin_schema().normalise(copy.deepcopy(obj)).obj
    live["metadata"].update(uid="u", resourceVersion="7", generation=1)
    engine = live["spec"]["template"]["spec"]["containers"][0]
    engine.update(imagePullPolicy="IfNotPresent", terminationMessagePath="/dev/termination-log")
    live["status"] = {"replicas": 1}
    return live


def engine(dep: dict[str, Any]) -> dict[str, Any]:
    return dep["spec"]["template"]["spec"]["containers"][0]


def test_what_the_server_stores_covers_the_render():
    desired = rendered_deployment(**SPEC)
    live = stored(desired)
    assert engine(live)["resources"]["requests"] == {"cpu": "500m", "memory": "1Gi"}
    assert engine(live)["resources"]["limits"]["ephemeral-storage"] == "512Mi"
    assert {"name": "EMPTY"} in engine(live)["env"]
    assert live != desired and covers(desired, live)


@pytest.mark.parametrize("edit", [
    lambda e: e["resources"]["requests"].update(cpu="600m"),
    lambda e: e["resources"]["limits"].update(memory="16G"),  # 16e9, not 16Gi
    lambda e: e["resources"]["limits"].pop("cpu"),
    lambda e: next(v for v in e["env"] if v["name"] == "EMPTY").update(value="x"),
    lambda e: next(v for v in e["env"] if v["name"] == "MODE").update(value="500m"),
    lambda e: e["args"].__setitem__(-1, "0.5e0"),
    lambda e: e.update(env=e["env"][:1]),
])
def test_real_edits_are_still_drift(edit):
    extra = ["--ready-kv-low-watermark", "0.5"]  # a value the engine parses, last
    desired = rendered_deployment(engine={"tensorParallelSize": 2, "extraArgs": extra}, **SPEC)
    live = stored(desired)
    edit(engine(live))
    assert not covers(desired, live)


def test_quantities_compare_by_value_only_where_quantities_are():
    assert covers({"limits": {"cpu": "0.5"}}, {"limits": {"cpu": "500m"}})
    assert covers({"requests": {"memory": "1024Mi"}}, {"requests": {"memory": "1Gi"}})
    assert covers({"emptyDir": {"sizeLimit": "4096Mi"}}, {"emptyDir": {"sizeLimit": "4Gi"}})
    assert covers({"limits": {"nvidia.com/gpu": 2}}, {"limits": {"nvidia.com/gpu": "2"}})
    assert covers({"limits": {"cpu": "1e3"}}, {"limits": {"cpu": "1k"}})
    assert not covers({"limits": {"cpu": "0.5"}}, {"limits": {"cpu": "501m"}})
    assert not covers({"args": ["0.5"]}, {"args": ["500m"]})
    assert not covers({"labels": {"size": "1024Mi"}}, {"labels": {"size": "1Gi"}})
    assert not covers({"limits": {"cpu": "1e999999"}}, {"limits": {"cpu": "1e1000000"}})


def test_empty_values_the_server_drops_count_as_present():
    assert covers({"env": [{"name": "X", "value": ""}]}, {"env": [{"name": "X"}]})
    assert covers({"a": [], "b": {}, "c": ""}, {})
    assert not covers({"env": [{"name": "X", "value": ""}]}, {"env": [{"name": "X",
                                                                      "value": "y"}]})
    assert not covers({"env": [{"name": "X", "value": "y"}]}, {"env": [{"name": "X"}]})
    assert not covers({"replicas": 0}, {})  # a number the server keeps
    assert not covers({"on": False}, {})


# Over HTTP, with the real operator.


def deployment_applies(cluster: Cluster, kind: str = "deployments") -> int:
    return len([r for r in cluster.requests_to("PATCH", f"/{kind}/llama")
                if r.url.path.endswith(f"/{kind}/llama")])  # fmt: skip


async def drain_events(operator) -> None:
    """Wait until the operator's queued Events have reached the API server."""
    loop = operator.events._task.get_loop()
    await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(operator.events.idle(), loop))


@pytest.mark.asyncio
async def test_a_steady_object_is_applied_once_across_deployment_status_updates(cluster,
                                                                                 operator):
    """``cpu: "0.5"``, ``memory: "1024Mi"`` and an empty env value: the server stores them
    otherwise; ten Deployment status updates (each a watch event and a reconcile) apply
    nothing more and write no ``Updated`` Event."""
    await create(cluster, llmd_body(**SPEC))
    dep = await cluster.wait_for(lambda: cluster.get(DEPLOYMENTS, "llama"))
    assert engine(dep)["resources"]["requests"] == {"cpu": "500m", "memory": "1Gi"}
    assert {"name": "EMPTY"} in engine(dep)["env"]
    await cluster.wait_for(lambda: status(cluster).get("observedGeneration") == 1)
    generation = dep["metadata"]["generation"]
    for count in range(1, 11):
        await cluster.call("PATCH", cluster.path(DEPLOYMENTS, "llama", "status"), {"status": {
            "observedGeneration": generation, "replicas": count, "updatedReplicas": count,
            "readyReplicas": 0,
        }})
        # The operator saw this update: status.replicas follows the Deployment's.
        await cluster.wait_for(lambda: status(cluster).get("replicas") == count)  # noqa: B023
    assert deployment_applies(cluster) == 1
    assert deployment_applies(cluster, "services") == 1
    assert cluster.get(SERVICES, "llama") is not None
    await drain_events(operator)
    reasons = [(e["reason"], e["message"]) for e in ours(cluster)]
    assert ("Created", "created Deployment llama") in reasons
    assert not [r for r in reasons if r[0] == "Updated"], reasons
