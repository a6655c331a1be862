"""Two real operators (kopf + controller, each in its own thread) against one emulator, electing
a leader on one Lease: only the leader writes; the standby takes over when the leader releases
the Lease and when it stops renewing, and then reconciles what changed meanwhile.

Time is one ``FakeClock`` that both electors read and only the tests move, so a lease expires
when a test says so and never because the machine is slow. A replica is cut off from the
Leases (``PartitionableClient.cut``) to stand for a leader that can no longer renew, or a
standby that cannot campaign yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest

from metroline.operator.controller import Controller
from metroline.operator.events import EventNote

from .conftest import (
    DEPLOYMENTS,
    LEASE_DURATION_S,
    LEASES,
    NS,
    Cluster,
    FakeClock,
    PartitionableClient,
    llmd_body,
    run_operator,
)
from .test_events import ours, settle, story
from .test_operator_flow import create, gpus, patch_spec, play_deployment_controller, status

pytestmark = pytest.mark.asyncio
LEASE = "metroline-operator"
KEY = (NS, "llama")
RENEW_DEADLINE_S = 10  # conftest's run_operator


def lease(cluster: Cluster) -> dict[str, Any]:
    return (cluster.get(LEASES, LEASE) or {}).get("spec") or {}


def holder(cluster: Cluster) -> str | None:
    return lease(cluster).get("holderIdentity")


def applies(cluster: Cluster, kind: str = "deployments") -> int:
    return sum(1 for r in cluster.requests_to("PATCH", f"/{kind}/llama")
               if r.url.path.endswith(f"/{kind}/llama"))  # fmt: skip


def status_patches(cluster: Cluster) -> list[str]:
    return [json.dumps(r.data, sort_keys=True)
            for r in cluster.requests_to("PATCH", "/llmdeployments/llama/status")]  # fmt: skip


def generation(controller: Controller) -> Any:
    return ((controller.cache.llmd(KEY) or {}).get("metadata") or {}).get("generation")


def writes(cluster: Cluster) -> int:
    """Writes of anything but Leases (applies, status, deletes, Events), by anyone."""
    return sum(1 for r in cluster.emulator if r.method.value in ("POST", "PATCH", "PUT", "DELETE")
               and "/leases" not in r.url.path)  # fmt: skip


async def two_operators(cluster, fake_engine, tmp_path, monkeypatch, stack, clock, **clients):
    """Operator a, the leader once it holds the Lease, then operator b beside it, both until
    ``stack`` closes; and a function that stops a alone."""
    a_stack = await stack.enter_async_context(contextlib.AsyncExitStack())
    a = await a_stack.enter_async_context(run_operator(
        cluster, fake_engine, tmp_path, monkeypatch, instance="operator-a", clock=clock,
        client=clients.get("a")))  # fmt: skip
    await cluster.wait_for(lambda: holder(cluster) == "operator-a" and a.leading)
    b = await stack.enter_async_context(run_operator(
        cluster, fake_engine, tmp_path, monkeypatch, instance="operator-b", clock=clock,
        client=clients.get("b")))  # fmt: skip
    return a, b, a_stack.aclose


async def test_two_operators_write_each_event_and_status_patch_once(
    cluster, fake_engine, tmp_path, monkeypatch
):
    async with contextlib.AsyncExitStack() as stack:
        a, b, _ = await two_operators(cluster, fake_engine, tmp_path, monkeypatch, stack,
                                      FakeClock())  # fmt: skip
        await create(cluster, llmd_body(replicas=2))
        await cluster.wait_for(lambda: cluster.get(DEPLOYMENTS, "llama"))
        await play_deployment_controller(cluster, ready=2)
        await cluster.wait_for(lambda: status(cluster).get("phase") == "Ready")
        await cluster.wait_for(lambda: status(cluster).get("kvCacheUtilization") == 0.42)
        await cluster.wait_for(lambda: any(r == "RolloutComplete" for _, r, _ in story(cluster)))
        # The standby has seen everything (its cache is warm) and tried for the Lease.
        await cluster.wait_for(lambda: generation(b) == 1 and b.cache.pods(KEY)
                               and b.elector.attempts >= 3)  # fmt: skip
        await settle(a)
        await settle(b)
        events = ours(cluster)
        assert events and all(e["count"] == 1 for e in events)
        assert all(count == 1 for count in story(cluster).values()), story(cluster)
        assert {e["reportingInstance"] for e in events} == {"operator-a"}
        assert len(cluster.requests_to("POST", "/events")) == len(events)
        patches = status_patches(cluster)
        assert patches and len(set(patches)) == len(patches), "a status was written twice"
        for kind in ("deployments", "services", "poddisruptionbudgets"):
            assert applies(cluster, kind) == 1, kind
        # The standby wrote nothing, reconciled nothing, scraped nothing, and stands by.
        assert holder(cluster) == "operator-a" and lease(cluster)["leaseTransitions"] == 0
        assert not b.leading and not b.elector.leading and b.elector.holder == "operator-a"
        assert b.reconciled == {} and b.kv == {}
        assert sum(b.metrics.applies.labels(k)._value.get() for k in
                   ("Deployment", "Service", "PodDisruptionBudget")) == 0  # fmt: skip


async def test_the_standby_takes_over_when_the_leader_releases_the_lease(
    cluster, fake_engine, tmp_path, monkeypatch
):
    clock = FakeClock()
    b_client = PartitionableClient(timeout_s=5)
    b_client.cut = "/leases/"  # b cannot campaign until the test lets it
    async with contextlib.AsyncExitStack() as stack:
        _, b, stop_a = await two_operators(cluster, fake_engine, tmp_path, monkeypatch, stack,
                                           clock, b=b_client)  # fmt: skip
        await create(cluster, llmd_body())
        await cluster.wait_for(lambda: status(cluster).get("observedGeneration") == 1)
        await stop_a()  # operator a stops cleanly: it gives the Lease up
        released = lease(cluster)
        assert released["holderIdentity"] == "" and released["leaseDurationSeconds"] == 1
        assert released["leaseTransitions"] == 0
        # A change while nobody leads: b sees it (a warm cache) and writes nothing.
        before = writes(cluster)
        await patch_spec(cluster, {"engine": {"tensorParallelSize": 4}})
        await cluster.wait_for(lambda: generation(b) == 2)
        await asyncio.sleep(0.3)
        assert writes(cluster) == before + 1  # the test's own patch
        assert gpus(cluster.get(DEPLOYMENTS, "llama")) == "2"
        b_client.cut = None
        # b takes the free Lease at once (the clock never moved) and reconciles the change.
        await cluster.wait_for(lambda: gpus(cluster.get(DEPLOYMENTS, "llama")) == "4")
        await cluster.wait_for(lambda: status(cluster).get("observedGeneration") == 2)
        spec = lease(cluster)
        assert spec["holderIdentity"] == "operator-b" and spec["leaseTransitions"] == 1
        assert spec["leaseDurationSeconds"] == LEASE_DURATION_S
        await cluster.wait_for(lambda: ("Normal", "Updated", "updated Deployment llama")
                               in story(cluster))  # fmt: skip
        await settle(b)
        updated = [e for e in ours(cluster) if e["reason"] == "Updated"]
        assert [e["reportingInstance"] for e in updated] == ["operator-b"]


async def test_a_leader_that_stops_renewing_stops_writing_and_the_standby_takes_over(
    cluster, fake_engine, tmp_path, monkeypatch
):
    clock = FakeClock()
    a_client = PartitionableClient(timeout_s=5)
    async with contextlib.AsyncExitStack() as stack:
        a, b, _ = await two_operators(cluster, fake_engine, tmp_path, monkeypatch, stack, clock,
                                      a=a_client)  # fmt: skip
        await create(cluster, llmd_body())
        await cluster.wait_for(lambda: cluster.get(DEPLOYMENTS, "llama"))
        await play_deployment_controller(cluster, ready=1)
        await cluster.wait_for(lambda: status(cluster).get("kvCacheUtilization") == 0.42)
        # a loses the Leases (it can still reach everything else), so it renews no more.
        failed = a.elector.failures
        a_client.cut = "/leases/"
        await cluster.wait_for(lambda: a.elector.failures > failed)
        version = cluster.get(LEASES, LEASE)["metadata"]["resourceVersion"]
        await cluster.wait_for(lambda: b.elector.observed_version == version)
        # Past a's renew deadline, not yet past the lease: a stops writing at once, b waits.
        clock.advance(RENEW_DEADLINE_S + 0.5)
        assert not a.leading and not b.leading
        before = writes(cluster)
        await patch_spec(cluster, {"engine": {"tensorParallelSize": 4}})
        await cluster.wait_for(lambda: generation(a) == 2 and generation(b) == 2)
        # What a had still queued goes nowhere either (here: an Event).
        note = EventNote("Normal", "Test", "written by a replica that lost the lease")
        await on_loop_of(a, record_and_wait(a, note))
        await asyncio.sleep(0.3)
        assert writes(cluster) == before + 1  # the test's own patch
        assert gpus(cluster.get(DEPLOYMENTS, "llama")) == "2"
        assert status(cluster)["observedGeneration"] == 1
        assert holder(cluster) == "operator-a"
        # The lease expires by b's clock: b takes it and reconciles the change made meanwhile.
        taken_at = len(status_patches(cluster))
        clock.advance(LEASE_DURATION_S - RENEW_DEADLINE_S)
        await cluster.wait_for(lambda: gpus(cluster.get(DEPLOYMENTS, "llama")) == "4")
        await cluster.wait_for(lambda: status(cluster).get("observedGeneration") == 2)
        spec = lease(cluster)
        assert spec["holderIdentity"] == "operator-b" and spec["leaseTransitions"] == 1
        assert spec["acquireTime"] == lease_after_takeover_acquire(cluster)
        # b scraped before it wrote: its status keeps the KV figure a had reported.
        assert all(json.loads(p)["status"].get("kvCacheUtilization") == 0.42
                   for p in status_patches(cluster)[taken_at:])  # fmt: skip
        assert not any(e["message"] == note.message for e in ours(cluster))
        # a's loop noticed; reconnected, it finds b's Lease and stays a standby.
        await cluster.wait_for(lambda: not a.elector.leading)
        a_client.cut = None
        await cluster.wait_for(lambda: a.elector.holder == "operator-b")
        assert not a.leading and b.leading
        applied = applies(cluster)
        await patch_spec(cluster, {"engine": {"tensorParallelSize": 8}})
        await cluster.wait_for(lambda: gpus(cluster.get(DEPLOYMENTS, "llama")) == "8")
        await settle(a)
        await settle(b)
        assert applies(cluster) == applied + 1
        assert a.reconciled[KEY] > 0 and holder(cluster) == "operator-b"


def lease_after_takeover_acquire(cluster: Cluster) -> str:
    """The acquireTime b wrote: its renewals keep it."""
    puts = [r for r in cluster.requests_to("PUT", f"/leases/{LEASE}")
            if r.data["spec"]["holderIdentity"] == "operator-b"]  # fmt: skip
    acquired = {r.data["spec"]["acquireTime"] for r in puts}
    assert len(acquired) == 1, acquired
    return acquired.pop()


async def record_and_wait(controller: Controller, note: EventNote) -> None:
    body = controller.cache.llmd(KEY)
    assert body is not None
    controller.events.record(body, note)
    await controller.events.idle()


async def on_loop_of(controller: Controller, coro: Any) -> Any:
    """Run ``coro`` on the operator's own event loop (its thread)."""
    assert controller.events._task is not None
    loop = controller.events._task.get_loop()
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))
