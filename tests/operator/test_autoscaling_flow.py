"""The built-in autoscaler end to end over HTTP: the kopf operator against the emulator, with
fake engine pods (tiny HTTP servers on 127.0.0.x serving Prometheus text whose figures the
tests set) driving the Deployment's replicas up and down within the windows; and scale to zero
with the activator waking the deployment for a held request.

The autoscaler's clock is a ``FakeClock`` only the tests move (windows pass when a test says
so, never because the machine is slow); the KV loop runs every 0.1 s of real time. The tests
play the Deployment controller and the kubelet (pods, their readiness and scheduling).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import aiohttp.web
import pytest
import pytest_asyncio

from metroline.operator import constants as c

from .conftest import DEPLOYMENTS, ENDPOINTSLICES, LLMD, NS, PODS, Cluster, FakeClock, llmd_body
from .conftest import run_operator as operator_of
from .test_events import ours, settle
from .test_operator_flow import conditions, create, status

pytestmark = pytest.mark.asyncio
HEAVY = {"kv": 0.32, "running": 12, "waiting": 6, "tokens_per_step": 7800}  # saturation 1.43
IDLE = {"kv": 0.02, "running": 0, "waiting": 0, "tokens_per_step": 0}


class FakePod:
    """One engine pod's HTTP face on ``ip``: /metrics with the figures of ``load`` (the step
    histogram advances by one step of ``tokens_per_step`` tokens per scrape, if any), and
    /v1/completions."""

    def __init__(self, ip: str) -> None:
        self.ip, self.load = ip, dict(IDLE)
        self.tokens = self.steps = 0.0

    async def metrics(self, _: aiohttp.web.Request) -> aiohttp.web.Response:
        if self.load["tokens_per_step"]:  # an idle engine runs no steps
            self.tokens += self.load["tokens_per_step"]
            self.steps += 1
        name = '{model_name="llama"}'
        return aiohttp.web.Response(
            text="".join(
                (
                    f"{c.KV_METRIC}{name} {self.load['kv']}\n",
                    f"{c.RUNNING_METRIC}{name} {self.load['running']}\n",
                    f"{c.WAITING_METRIC}{name} {self.load['waiting']}\n",
                    f"{c.STEP_TOKENS_METRIC}_sum{name} {self.tokens}\n",
                    f"{c.STEP_TOKENS_METRIC}_count{name} {self.steps}\n",
                )
            )
        )

    async def completions(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        prompt = (await request.json())["prompt"]
        return aiohttp.web.json_response(
            {"object": "text_completion", "pod": self.ip, "choices": [{"text": f"echo {prompt}"}]}
        )


class FakePods:
    """Up to four engine pods on 127.0.0.1-4, one port (``port``: the operator scrapes and
    the activator proxies to podIP:port)."""

    def __init__(self) -> None:
        self.port, self.pods, self._runners = 0, [], []

    async def start(self, count: int = 4) -> None:
        for index in range(count):
            pod = FakePod(f"127.0.0.{index + 1}")
            app = aiohttp.web.Application()
            app.router.add_get(c.METRICS_PATH, pod.metrics)
            app.router.add_post("/v1/completions", pod.completions)
            runner = aiohttp.web.AppRunner(app)
            await runner.setup()
            await aiohttp.web.TCPSite(runner, pod.ip, self.port).start()
            self.port = self.port or runner.addresses[0][1]
            self.pods.append(pod)
            self._runners.append(runner)

    async def close(self) -> None:
        for runner in self._runners:
            await runner.cleanup()


@pytest_asyncio.fixture
async def pods() -> AsyncIterator[FakePods]:
    fakes = FakePods()
    await fakes.start()
    yield fakes
    await fakes.close()


@contextlib.asynccontextmanager
async def autoscaling_operator(cluster, pods, tmp_path, monkeypatch):
    """The operator, its autoscaler on a clock the test moves."""
    async with operator_of(cluster, pods, tmp_path, monkeypatch) as controller:
        clock = FakeClock()
        controller.scaler.monotonic = clock
        yield controller, clock


def replicas(cluster: Cluster) -> int | None:
    dep = cluster.get(DEPLOYMENTS, "llama")
    return None if dep is None else dep["spec"]["replicas"]


def scaling(cluster: Cluster) -> dict[str, Any]:
    return status(cluster).get("autoscaling") or {}


async def play_pods(cluster: Cluster, ready: int, unschedulable: int = 0) -> None:
    """The Deployment controller and kubelet: as many pods as the Deployment asks for, the
    first ``ready`` of them ready on 127.0.0.(i+1), the last ``unschedulable`` waiting for a
    GPU; pods beyond the count deleted."""
    dep = cluster.get(DEPLOYMENTS, "llama")
    assert dep is not None
    want, labels = dep["spec"]["replicas"], dep["spec"]["template"]["metadata"]["labels"]
    for index in range(4):
        name = f"llama-5d8f-{index}"
        if index >= want:
            if cluster.get(PODS, name) is not None:
                await cluster.call("DELETE", cluster.path(PODS, name))
            continue
        if index >= want - unschedulable:
            state = {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
                    }
                ],
            }
        else:
            state = {
                "phase": "Running",
                "podIP": f"127.0.0.{index + 1}",
                "conditions": [{"type": "Ready", "status": "True" if index < ready else "False"}],
            }
        if cluster.get(PODS, name) is None:
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {
                "name": name, "namespace": NS, "labels": labels}, "spec": dep["spec"]["template"]
                ["spec"], "status": state}  # fmt: skip
            await cluster.call("POST", cluster.path(PODS), pod, "application/json")
        else:
            await cluster.call("PATCH", cluster.path(PODS, name, "status"), {"status": state})
    await cluster.call(
        "PATCH",
        cluster.path(DEPLOYMENTS, "llama", "status"),
        {
            "status": {
                "observedGeneration": dep["metadata"]["generation"],
                "replicas": want,
                "updatedReplicas": want,
                "readyReplicas": min(ready, want),
                "availableReplicas": min(ready, want),
            }
        },
    )


def autoscaled(**autoscaling: Any) -> dict[str, Any]:
    body = llmd_body()
    body["spec"].pop("replicas")
    body["spec"]["autoscaling"] = autoscaling
    return body


async def test_load_drives_the_replicas_up_and_down_within_the_windows(
    cluster, pods, tmp_path, monkeypatch
):
    async with autoscaling_operator(cluster, pods, tmp_path, monkeypatch) as (controller, clock):
        await create(
            cluster, autoscaled(minReplicas=2, maxReplicas=6, scaleDownStabilizationSeconds=60)
        )
        await cluster.wait_for(lambda: replicas(cluster) == 2)  # minReplicas to start with
        await play_pods(cluster, ready=2)
        await cluster.wait_for(lambda: scaling(cluster).get("measuredReplicas") == 2)
        assert replicas(cluster) == 2
        # Prefill-heavy load on both: KV 0.32, but the token budget full and a queue.
        for pod in pods.pods[:2]:
            pod.load = dict(HEAVY)
        await cluster.wait_for(lambda: replicas(cluster) == 4)
        last = await cluster.wait_for(lambda: scaling(cluster).get("lastDecision"))
        assert (last["from"], last["to"], last["reason"]) == (2, 4, "ScaledUp")
        assert "saturation 1.43 above target 0.8 over 2 measured pod(s)" in last["message"]
        got = scaling(cluster)
        assert got["desiredReplicas"] == 4
        assert got["currentSignal"] == {
            "kvCacheUtilization": 0.32,
            "waitingRequestsPerReplica": 6.0,
            "saturation": 1.43,
        }
        # Two more pods: one loads, one waits for a GPU. The third's load asks for six:
        # held at four while a pod is Unschedulable.
        pods.pods[2].load = dict(HEAVY)
        await play_pods(cluster, ready=3, unschedulable=1)
        limited = await cluster.wait_for(  # the third pod's token rate takes two scrapes
            lambda: (
                (cond := conditions(cluster).get("ScalingLimited"))
                and "asks for 6" in cond[2]
                and cond
            )
        )
        assert limited[:2] == ("True", "GPUsUnavailable") and "holding at 4" in limited[2]
        assert replicas(cluster) == 4 and scaling(cluster)["measuredReplicas"] == 3
        # The load goes away: down to minReplicas only once the 60 s window has passed.
        for pod in pods.pods:
            pod.load = dict(IDLE)
        await play_pods(cluster, ready=4)
        await cluster.wait_for(
            lambda: scaling(cluster).get("currentSignal", {}).get("saturation") == 0.0
        )
        await asyncio.sleep(0.5)  # several decisions within the window
        assert replicas(cluster) == 4
        clock.advance(61)
        await cluster.wait_for(lambda: replicas(cluster) == 2)
        await cluster.wait_for(lambda: scaling(cluster)["lastDecision"]["reason"] == "ScaledDown")
        await settle(controller)
    spec = cluster.get(LLMD, "llama")["spec"]
    assert "replicas" not in spec  # never written, by anyone
    assert not [
        r
        for r in cluster.emulator
        if "/llmdeployments/llama" in r.url.path
        and r.method.value in ("PATCH", "PUT")
        and r.subresource != "status"
    ]
    reasons = [e["reason"] for e in ours(cluster) if e["reason"] in ("ScaledUp", "ScaledDown")]
    assert reasons == ["ScaledUp", "ScaledDown"]  # one Event per decision


async def test_scale_to_zero_and_a_request_wakes_it(cluster, pods, tmp_path, monkeypatch):
    async with autoscaling_operator(cluster, pods, tmp_path, monkeypatch) as (op, clock):
        await create(cluster, autoscaled(maxReplicas=2, scaleToZeroAfterSeconds=300))
        await cluster.wait_for(lambda: replicas(cluster) == 1)
        await play_pods(cluster, ready=1)
        await cluster.wait_for(lambda: scaling(cluster).get("measuredReplicas") == 1)
        assert conditions(cluster)["ScaledToZero"][:2] == ("False", "Serving")
        clock.advance(301)  # idle all along
        await cluster.wait_for(lambda: replicas(cluster) == 0)
        route = await cluster.wait_for(lambda: cluster.get(ENDPOINTSLICES, "llama"))
        assert route["metadata"]["labels"][c.SERVICE_NAME_LABEL] == "llama"
        assert route["endpoints"] == [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]
        (port,) = route["ports"]
        assert port["name"] == "http" and port["port"] == op.scaler.activator.port
        await cluster.wait_for(lambda: conditions(cluster).get("ScaledToZero", ("",))[0] == "True")
        assert conditions(cluster)["Ready"][:2] == ("False", "ScaledToZero")
        assert "scaled to zero after 300 s" in conditions(cluster)["Ready"][2]
        await cluster.wait_for(lambda: scaling(cluster)["lastDecision"]["reason"] == "ScaledToZero")
        await play_pods(cluster, ready=0)  # the pod goes
        # A request reaches the Service: kube-proxy sends it to the slice's endpoint.
        url = f"http://127.0.0.1:{port['port']}/v1/completions"
        async with aiohttp.ClientSession() as session:
            held = asyncio.create_task(
                session.post(
                    url, data=json.dumps({"prompt": "hi"}), headers={"Host": "llama.ml.svc:8000"}
                )
            )
            await cluster.wait_for(lambda: replicas(cluster) == 1)  # woken
            assert not held.done()
            await play_pods(cluster, ready=1)  # the pod loads and turns ready
            response = await asyncio.wait_for(held, 60)
            assert response.status == 200
            assert (await response.json())["choices"] == [{"text": "echo hi"}]
        await cluster.wait_for(lambda: cluster.get(ENDPOINTSLICES, "llama") is None)
        await cluster.wait_for(
            lambda: conditions(cluster)["ScaledToZero"][:2] == ("False", "Serving")
        )
        await cluster.wait_for(lambda: scaling(cluster)["lastDecision"]["reason"] == "Activated")
        await settle(op)
    assert "replicas" not in cluster.get(LLMD, "llama")["spec"]
    events = [(e["reason"], e["message"]) for e in ours(cluster)]
    (asleep,) = [
        i
        for i, (reason, message) in enumerate(events)
        if reason == "ScaledToZero" and message.startswith("no request for 301 s")
    ]
    (woken,) = [i for i, (reason, _) in enumerate(events) if reason == "Activated"]
    assert asleep < woken  # one Event per decision


async def test_an_unreachable_activator_keeps_the_deployment_up(
    cluster, pods, tmp_path, monkeypatch
):
    async with autoscaling_operator(cluster, pods, tmp_path, monkeypatch) as (op, clock):
        op.scaler.pod_ip = None  # as without METROLINE_POD_IP
        await create(cluster, autoscaled(maxReplicas=2, scaleToZeroAfterSeconds=60))
        await cluster.wait_for(lambda: replicas(cluster) == 1)
        await play_pods(cluster, ready=1)
        cond = await cluster.wait_for(lambda: conditions(cluster).get("ScaledToZero"))
        assert cond[:2] == ("False", "ActivatorUnavailable") and "METROLINE_POD_IP" in cond[2]
        await cluster.wait_for(lambda: scaling(cluster).get("measuredReplicas") == 1)
        clock.advance(3600)
        await asyncio.sleep(0.5)
        assert replicas(cluster) == 1 and cluster.get(ENDPOINTSLICES, "llama") is None
