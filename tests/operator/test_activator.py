"""The activator (``operator/activator.py``) over real HTTP: a request for a deployment at zero
is held, reported, and proxied (streamed) to an engine pod once one is ready; or answered 503
with Retry-After when the hold ends first; its bounds; and how ``Scaler.find`` tells which
LLMDeployment a request is for. The operator flow with the emulator is in
``test_autoscaling_flow.py``."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import aiohttp.web
import kubernetes_validate
import pytest

from metroline.operator import constants as c
from metroline.operator.activator import RETRY_AFTER_S, Activator
from metroline.operator.cache import ClusterCache, Key
from metroline.operator.checks import check_spec
from metroline.operator.config import OperatorConfig
from metroline.operator.kvmetrics import KvScraper
from metroline.operator.render import Scaling, render_children, unwanted_children
from metroline.operator.scaler import Scaler

from .conftest import K8S_VERSIONS, live_body, llmd_body
from .crd_validation import defaulted
from .test_manifests import _rules, one

KEY = ("ml", "llama")
HOST = "llama.ml.svc:8000"


class Directory:
    """The activator's view of the operator, set by the test: which host names ``KEY``, the
    ready pods' addresses, the hold time; it records each demand."""

    def __init__(self, hold_s: float = 60.0) -> None:
        self.ready: list[str] = []
        self.demands: list[Key] = []
        self.hold = hold_s

    def find(self, host: str) -> Key | None:
        return KEY if host == HOST else None

    def demand(self, key: Key) -> None:
        self.demands.append(key)

    def addresses(self, key: Key) -> list[str]:
        return list(self.ready)

    def hold_s(self, key: Key) -> float:
        return self.hold


async def started(directory: Directory, engine_port: int, **bounds) -> Activator:
    activator = Activator(directory, engine_port, port=0, host="127.0.0.1", poll_s=0.01,
                          **bounds)  # fmt: skip
    await activator.start()
    return activator


async def post(activator: Activator, body: bytes | dict, host: str = HOST,
               path: str = "/v1/completions?trace=1") -> tuple[int, dict, bytes]:  # fmt: skip
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{activator.port}{path}",
            data=data,
            headers={"Host": host, "Content-Type": "application/json"},
        ) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


async def until(predicate, timeout: float = 30.0) -> None:
    """Wait for ``predicate()``; ``timeout`` only catches a stall."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "stalled"
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_a_request_at_zero_is_held_until_a_pod_is_ready_and_answered_by_it(engine):
    fake, port = engine
    directory = Directory()
    activator = await started(directory, port)
    try:
        held = asyncio.create_task(post(activator, {"model": "llama-7b", "prompt": "hi"}))
        await until(lambda: activator.held == 1 and directory.demands == [KEY])
        await asyncio.sleep(0.05)  # polled a few times: still held, nobody answered yet
        assert not held.done() and fake.seen == []
        directory.ready = ["127.0.0.1"]  # the Deployment was scaled to one; its pod is ready
        status, headers, body = await held
    finally:
        await activator.stop()
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    assert headers["X-Engine"] == "pod-0"
    assert body == b"data: alpha\n\ndata: beta\n\ndata: gamma\n\ndata: [DONE]\n\n"
    (seen,) = fake.seen
    assert seen["path"] == "/v1/completions?trace=1"
    assert seen["body"] == {"model": "llama-7b", "prompt": "hi"}
    assert seen["headers"]["X-Forwarded-For"] == "127.0.0.1"
    assert activator.held == activator.held_bytes == 0


@pytest.mark.asyncio
async def test_the_hold_ends_in_503_with_retry_after(engine):
    directory = Directory(hold_s=0.2)
    activator = await started(directory, engine[1])
    try:
        status, headers, body = await post(activator, {"prompt": "hi"})
    finally:
        await activator.stop()
    assert status == 503 and headers["Retry-After"] == str(RETRY_AFTER_S)
    error = json.loads(body)["error"]
    assert error["code"] == "activating" and "ml/llama is waking up" in error["message"]
    assert directory.demands == [KEY] and engine[0].seen == []


@pytest.mark.asyncio
async def test_bounds_and_requests_for_no_deployment(engine):
    directory = Directory()
    activator = await started(directory, engine[1], max_body=1024, max_held=1)
    try:
        status, _, body = await post(activator, b"x" * 1025)
        assert status == 413 and json.loads(body)["error"]["code"] == "too_large"
        status, _, body = await post(activator, {"model": "llama-7b"}, host="other.ns.svc:8000")
        assert status == 404  # the body's model never chooses the target
        assert "'other.ns.svc:8000'" in json.loads(body)["error"]["message"]
        first = asyncio.create_task(post(activator, {"prompt": "a"}))
        await until(lambda: activator.held == 1)
        status, headers, body = await post(activator, {"prompt": "b"})
        assert status == 503 and headers["Retry-After"] == str(RETRY_AFTER_S)
        assert json.loads(body)["error"]["code"] == "activator_full"
        directory.ready = ["127.0.0.1"]
        assert (await first)[0] == 200
    finally:
        await activator.stop()


@pytest.mark.asyncio
async def test_a_pod_that_does_not_answer_is_a_502():
    directory = Directory()
    directory.ready = ["127.0.0.1"]
    activator = await started(directory, engine_port=1)  # nothing listens on port 1
    try:
        status, _, body = await post(activator, {"prompt": "hi"})
    finally:
        await activator.stop()
    assert status == 502 and json.loads(body)["error"]["code"] == "bad_gateway"


def slice_of(name: str, namespace: str) -> dict:
    """The activator's EndpointSlice of an LLMDeployment (present while it is at zero)."""
    owner = {"apiVersion": f"{c.GROUP}/{c.VERSION}", "kind": c.KIND, "name": name,
             "controller": True, "uid": "u"}  # fmt: skip
    meta = {"name": name, "namespace": namespace, "ownerReferences": [owner]}
    return {"kind": "EndpointSlice", "metadata": meta}


def test_which_deployment_a_request_is_for():
    cache = ClusterCache()
    scaled = {"maxReplicas": 2, "scaleToZeroAfterSeconds": 600}
    for name, ns, spec in (
        ("llama", "ml", {"autoscaling": scaled, "model": {"uri": "hf://meta/llama-7b"}}),
        (
            "qwen",
            "ml",
            {"autoscaling": scaled, "model": {"uri": "/models/q", "servedName": "qwen3"}},
        ),
        ("qwen", "other", {"autoscaling": scaled, "model": {"uri": "/models/q"}}),
        ("fixed", "ml", {"replicas": 1}),  # no scale to zero: never the activator's
    ):
        body = llmd_body(name, **spec)
        body["metadata"]["namespace"] = ns
        if "replicas" not in spec:
            body["spec"].pop("replicas")
        cache.put_llmd(body)
        if (name, ns) != ("qwen", "other"):  # at zero: the activator fronts its Service
            cache.put_child(slice_of(name, ns))
    config = OperatorConfig(pod_ip="10.0.0.5", activator_port=0)
    scaler = Scaler(cache, KvScraper(), config, record=lambda *_: None, clock=lambda: "",
                    enqueue=lambda _: None, leading=lambda: True)  # fmt: skip
    find = scaler.find
    assert find("llama.ml.svc:8000") == ("ml", "llama")
    assert find("llama.ml.svc.cluster.local") == ("ml", "llama")
    assert find("LLAMA.ml") == ("ml", "llama")
    assert find("qwen:8000") == ("ml", "qwen")  # a short name unique among those at zero
    assert find("llama") == ("ml", "llama")
    assert find("qwen.other.svc:8000") is None  # awake: its pods serve, not the activator
    cache.put_child(slice_of("qwen", "other"))
    assert find("qwen.other.svc:8000") == ("other", "qwen")
    assert find("qwen:8000") is None  # now two namespaces have one
    assert find("api.example.com") is None  # no Host naming the Service: nothing chosen
    assert find("fixed.ml.svc:8000") is None
    assert find("llama.ml.example.com") is None


def test_the_install_gives_the_activator_its_port_address_and_slices():
    container = one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[c.ACTIVATOR_PORT_NAME] == c.ACTIVATOR_PORT == OperatorConfig().activator_port
    env = {e["name"]: e for e in container["env"]}
    assert env["METROLINE_POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert OperatorConfig.from_env({"METROLINE_POD_IP": "10.1.2.3"}).pod_ip == "10.1.2.3"
    with pytest.raises(ValueError, match="METROLINE_POD_IP"):
        OperatorConfig(pod_ip="pod-0")
    with pytest.raises(ValueError, match="METROLINE_ACTIVATOR_PORT"):
        OperatorConfig(activator_port=8081)
    # Applied when a Service scales to zero, deleted once a pod is ready; watched for drift.
    assert {"list", "watch", "create", "patch", "delete"} <= _rules()[
        ("discovery.k8s.io", "endpointslices")
    ]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("address", ["10.1.2.3", "fd00::5"])
def test_at_zero_the_service_gets_the_activators_endpointslice(version, address):
    body = live_body(replicas=None, autoscaling={"maxReplicas": 3, "scaleToZeroAfterSeconds": 60})
    body["spec"].pop("replicas")
    check = check_spec("llama", defaulted(body)["spec"])
    kinds = {o["kind"]: o for o in render_children(body, check, "e:1", Scaling(0, (address, 8082)))}
    assert list(kinds) == ["Service", "EndpointSlice", "Deployment", "PodDisruptionBudget"]
    route, service = kinds["EndpointSlice"], kinds["Service"]
    assert kubernetes_validate.validate(route, version, strict=True)
    assert route["metadata"]["name"] == service["metadata"]["name"] == "llama"
    assert route["metadata"]["labels"][c.SERVICE_NAME_LABEL] == "llama"
    assert route["metadata"]["labels"][c.SLICE_MANAGED_BY_LABEL] == c.MANAGED_BY
    assert route["addressType"] == ("IPv6" if ":" in address else "IPv4")
    assert route["endpoints"] == [{"addresses": [address], "conditions": {"ready": True}}]
    # kube-proxy maps the Service's port by name to this slice's port.
    assert [p["name"] for p in route["ports"]] == [p["name"] for p in service["spec"]["ports"]]
    assert route["ports"][0]["port"] == 8082
    assert kinds["Deployment"]["spec"]["replicas"] == 0  # the autoscaler's, not spec.replicas
    assert service["spec"]["selector"] == kinds["Deployment"]["spec"]["selector"]["matchLabels"]
    awake = render_children(body, check, "e:1", Scaling(2))
    assert [o["kind"] for o in awake] == ["Service", "Deployment", "PodDisruptionBudget"]
    assert ("discovery.k8s.io/v1", "EndpointSlice") in [
        (api, kind) for api, kind, _ in unwanted_children(check, Scaling(2))]  # fmt: skip
    # Without a plan (none decided yet): minReplicas. The PDB follows maxReplicas >= 2.
    (dep,) = [o for o in render_children(body, check, "e:1") if o["kind"] == "Deployment"]
    assert dep["spec"]["replicas"] == 1
