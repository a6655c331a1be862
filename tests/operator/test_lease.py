"""Leader election on the emulator's Lease, one step at a time (``leader.LeaderElector``), the
emulator's PUT and optimistic concurrency, and the controller's write gate. Time is a
``FakeClock`` and the Lease's timestamps come from a fake wall clock: nothing waits."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator
from typing import Any

import kopf
import pytest
import pytest_asyncio

from metroline.operator.config import OperatorConfig
from metroline.operator.controller import Controller
from metroline.operator.events import EventNote
from metroline.operator.kube import ApiError, KubeClient
from metroline.operator.leader import LeaderElector, NotLeader, micro_time

from .conftest import LEASES, NS, Cluster, FakeClock, live_body

NAME = "metroline-operator"


class FakeWall:
    """Wall-clock time for the Lease's timestamps: one second later at each reading."""

    def __init__(self) -> None:
        self.at = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)

    def __call__(self) -> datetime.datetime:
        self.at += datetime.timedelta(seconds=1)
        return self.at


@pytest_asyncio.fixture
async def client(cluster: Cluster) -> AsyncIterator[KubeClient]:
    api = KubeClient(timeout_s=5)
    api.connect(kopf.ConnectionInfo(server=str(cluster.server.url), token="test"))
    yield api
    await api.close()


def elector(client: KubeClient, identity: str, clock: FakeClock) -> LeaderElector:
    config = OperatorConfig(instance=identity, lease_namespace=NS, lease_duration_s=15,
                            lease_renew_deadline_s=10, lease_retry_period_s=2)  # fmt: skip
    return LeaderElector(client, config, monotonic=clock, now=FakeWall())


def spec(cluster: Cluster) -> dict[str, Any]:
    lease = cluster.get(LEASES, NAME)
    assert lease is not None
    return lease["spec"]


@pytest.mark.asyncio
async def test_a_missing_lease_is_created_then_renewed(cluster, client):
    clock = FakeClock()
    a = elector(client, "a", clock)
    changes: list[bool] = []
    a.on_change = changes.append
    assert await a.step() and a.is_leader() and changes == [True]
    first = cluster.get(LEASES, NAME)
    assert first["apiVersion"] == "coordination.k8s.io/v1" and first["kind"] == "Lease"
    assert first["spec"]["holderIdentity"] == "a"
    assert first["spec"]["leaseDurationSeconds"] == 15
    assert first["spec"]["leaseTransitions"] == 0
    assert first["spec"]["acquireTime"] == first["spec"]["renewTime"]
    assert first["spec"]["renewTime"].endswith(".000000Z")  # a MicroTime
    assert await a.step()
    renewed = cluster.get(LEASES, NAME)
    assert renewed["spec"]["renewTime"] > first["spec"]["renewTime"]
    assert renewed["spec"]["acquireTime"] == first["spec"]["acquireTime"]
    assert renewed["spec"]["leaseTransitions"] == 0
    assert int(renewed["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])
    # Renewals are updates under the resourceVersion read, never blind writes.
    puts = cluster.requests_to("PUT", f"/leases/{NAME}")
    assert puts and all(r.data["metadata"]["resourceVersion"] for r in puts)
    assert changes == [True]


@pytest.mark.asyncio
async def test_a_held_lease_is_taken_only_once_expired_by_the_candidates_clock(cluster, client):
    clock = FakeClock()
    a, b = elector(client, "a", clock), elector(client, "b", clock)
    assert await a.step()
    assert not await b.step() and not b.is_leader() and b.holder == "a"
    clock.advance(14.9)  # a renews no more, but 15 s have not passed since b saw its record
    assert not await b.step()
    assert not a.is_leader()  # past its 10 s renew deadline: a stopped writing, loop or not
    clock.advance(0.2)
    assert await b.step() and b.is_leader()
    assert spec(cluster)["holderIdentity"] == "b" and spec(cluster)["leaseTransitions"] == 1
    assert spec(cluster)["acquireTime"] == spec(cluster)["renewTime"]
    changes: list[bool] = []
    a.on_change = changes.append
    assert not await a.step()  # a sees b's record: it stops leading and stands by
    assert changes == [False] and not a.leading and a.holder == "b"


@pytest.mark.asyncio
async def test_a_standby_waits_a_whole_lease_after_any_renewal(cluster, client):
    clock = FakeClock()
    a, b = elector(client, "a", clock), elector(client, "b", clock)
    assert await a.step()
    assert not await b.step()
    clock.advance(9)
    assert await a.step()  # a renewed in time
    assert not await b.step()  # b's wait starts again from when it saw this record
    clock.advance(9)
    assert a.is_leader() and not await b.step()
    clock.advance(6.1)  # 15.1 s since b saw the renewal (18.1 s since a's first record)
    assert await b.step()


@pytest.mark.asyncio
async def test_a_leader_stops_at_its_renew_deadline_without_its_loop(cluster, client):
    clock = FakeClock()
    a = elector(client, "a", clock)
    assert await a.step()
    clock.advance(9.9)
    assert a.is_leader()
    clock.advance(0.2)
    assert not a.is_leader() and a.leading  # the loop has not noticed; the gate has
    changes: list[bool] = []
    a.on_change = changes.append
    # Nobody took it: renewing starts a new term (the controller takes over again and
    # queues what it skipped while it could not write).
    assert await a.step() and a.is_leader()
    assert changes == [False, True]


@pytest.mark.asyncio
async def test_release_clears_the_holder_and_a_standby_takes_over_at_once(cluster, client):
    clock = FakeClock()
    a, b = elector(client, "a", clock), elector(client, "b", clock)
    assert await a.step()
    assert not await b.step()
    assert await a.release() and not a.is_leader()
    released = spec(cluster)
    assert released["holderIdentity"] == "" and released["leaseDurationSeconds"] == 1
    assert released["leaseTransitions"] == 0
    assert await b.step()  # no clock advance: a free Lease is taken at once
    assert spec(cluster)["holderIdentity"] == "b" and spec(cluster)["leaseTransitions"] == 1
    assert not await a.release()  # not the holder: nothing to give up


@pytest.mark.asyncio
async def test_two_candidates_never_both_win(cluster, client):
    clock = FakeClock()
    a, b = elector(client, "a", clock), elector(client, "b", clock)
    # Both find no Lease and create it at once: one create is answered 409 AlreadyExists.
    won = await asyncio.gather(a.step(), b.step())
    assert sorted(won) == [False, True]
    leader = a if won[0] else b
    assert await leader.release()
    # Both read the free Lease; both update under the same resourceVersion: one gets 409.
    lease = await client.request("GET", a.path)
    record = {"holderIdentity": "a", "leaseDurationSeconds": 15}
    await a._update(lease, record)
    with pytest.raises(ApiError) as conflict:
        await b._update(lease, {**record, "holderIdentity": "b"})
    assert conflict.value.status == 409 and conflict.value.reason == "Conflict"
    assert "the object has been modified" in conflict.value.message
    assert spec(cluster)["holderIdentity"] == "a"
    for _ in range(3):
        await asyncio.gather(a.step(), b.step())
        assert [a.is_leader(), b.is_leader()].count(True) <= 1


@pytest.mark.asyncio
async def test_the_emulator_answers_put_as_the_api_server(cluster, client):
    path = cluster.path(LEASES, "x")
    lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
             "metadata": {"name": "x", "namespace": NS}, "spec": {"holderIdentity": "a"}}
    with pytest.raises(ApiError) as missing:
        await client.request("PUT", path, body=lease)
    assert missing.value.status == 404
    created = await client.request("POST", cluster.path(LEASES), body=lease)
    with pytest.raises(ApiError) as exists:
        await client.request("POST", cluster.path(LEASES), body=lease)
    assert exists.value.status == 409
    same = await client.request("PUT", path, body=created)  # a no-op: no new version
    assert same["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
    changed = await client.request("PUT", path, body={**created, "spec": {"holderIdentity": "b"}})
    assert changed["spec"] == {"holderIdentity": "b"}
    assert changed["metadata"]["uid"] == created["metadata"]["uid"]
    assert changed["metadata"]["resourceVersion"] != created["metadata"]["resourceVersion"]
    with pytest.raises(ApiError) as stale:
        await client.request("PUT", path, body=created)
    assert stale.value.status == 409
    with pytest.raises(ApiError) as stale_patch:
        await client.request("PATCH", path, body=created,
                             content_type="application/merge-patch+json")  # fmt: skip
    assert stale_patch.value.status == 409
    renamed = {**changed, "metadata": {**changed["metadata"], "name": "y"}}
    with pytest.raises(ApiError) as wrong_name:
        await client.request("PUT", path, body=renamed)
    assert wrong_name.value.status == 400
    unconditional = {**changed, "metadata": {"name": "x"}, "spec": {"holderIdentity": "c"}}
    assert (await client.request("PUT", path, body=unconditional))["spec"]["holderIdentity"] == "c"


class Recording:
    """A client that records each write it is asked to make."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def apply(self, obj: Any) -> tuple[dict[str, Any], bool]:
        self.calls.append("apply")
        return obj, True

    async def patch_status(self, _namespace: str, name: str, status: Any) -> dict[str, Any]:
        self.calls.append("patch_status")
        return {**live_body(name), "status": status}

    async def create_event(self, event: Any) -> dict[str, Any]:
        self.calls.append("create_event")
        return event


class Stub:
    """An elector whose verdict the test sets."""

    def __init__(self) -> None:
        self.leader = False
        self.on_change: Any = None

    def is_leader(self) -> bool:
        return self.leader


@pytest.mark.asyncio
async def test_a_controller_that_does_not_lead_writes_nothing():
    api, stub = Recording(), Stub()
    controller = Controller(api, OperatorConfig(engine_image="e:1"),  # type: ignore[arg-type]
                            elector=stub)  # type: ignore[arg-type]
    body = live_body()
    controller.cache.put_llmd(body)
    key = (NS, "llama")
    with pytest.raises(NotLeader):
        await controller.reconcile(key)
    assert api.calls == []  # the write was refused before it was made
    results = controller.metrics.reconciles
    assert sum(results.labels(r)._value.get() for r in ("ok", "error")) == 0  # not a reconcile
    # Taking over: leads once the elector says so and the takeover ran.
    stub.leader = True
    assert not controller.leading
    await controller._take_over()
    assert controller.leading
    await controller.reconcile(key)
    assert "apply" in api.calls and "patch_status" in api.calls
    # The lease lost: the next write is refused at once, Events included.
    stub.leader, api.calls = False, []
    controller.events.start()
    controller.events.record(body, EventNote("Normal", "Test", "a note"))
    await controller.events.idle()
    await controller.events.stop()
    with pytest.raises(NotLeader):
        await controller.api(api.apply({}))
    assert api.calls == []


def test_the_lease_settings_come_from_the_environment():
    config = OperatorConfig.from_env({"METROLINE_POD_NAME": "metroline-operator-7d9-x2",
                                      "METROLINE_NAMESPACE": "ops",
                                      "METROLINE_LEASE_NAME": "ml-lease"})  # fmt: skip
    assert (config.instance, config.lease_namespace, config.lease_name) == (
        "metroline-operator-7d9-x2", "ops", "ml-lease")
    default = OperatorConfig.from_env({})
    assert (default.lease_namespace, default.lease_name) == ("metroline-system",
                                                             "metroline-operator")
    assert (default.lease_duration_s, default.lease_renew_deadline_s,
            default.lease_retry_period_s) == (15, 10, 2)  # client-go's defaults
    with pytest.raises(ValueError, match="RENEW_DEADLINE"):
        OperatorConfig(lease_duration_s=10, lease_renew_deadline_s=10)


def test_micro_time_is_rfc3339_with_microseconds():
    at = datetime.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=datetime.UTC)
    assert micro_time(at) == "2026-01-02T03:04:05.000006Z"


@pytest.mark.parametrize(("name", "value"), [
    ("METROLINE_WORKERS", "0"), ("METROLINE_WORKERS", "100000"),
    ("METROLINE_KV_INTERVAL_SECONDS", "nan"), ("METROLINE_KV_INTERVAL_SECONDS", "-1"),
    ("METROLINE_LEASE_DURATION_SECONDS", str(2**31)),
])
def test_settings_out_of_range_are_refused_at_start(name, value):
    with pytest.raises(ValueError, match=name):
        OperatorConfig.from_env({name: value})
