"""Fixtures for the operator: LLMDeployment bodies, and a real kopf operator run in-process
against KMock's Kubernetes emulator over HTTP (see ``emulator.py`` for what was added to it).

Each operator elects itself leader on a Lease in namespace ``ml``, as in production, but on a
``FakeClock`` that moves only when a test moves it: no lease expires, and no leader misses its
renew deadline, however slow the machine."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp.web
import kmock
import kopf
import pytest
import pytest_asyncio
import yaml

from metroline.operator import constants as c
from metroline.operator.backoff import Backoff
from metroline.operator.config import OperatorConfig
from metroline.operator.controller import Controller
from metroline.operator.handlers import build_registry
from metroline.operator.kube import ApiError, KubeClient
from metroline.operator.leader import LeaderElector

from .emulator import MetrolineEmulator

NS = "ml"
LLMD = kmock.resource(c.GROUP, c.VERSION, c.PLURAL)
DEPLOYMENTS = kmock.resource("apps", "v1", "deployments")
SERVICES = kmock.resource("", "v1", "services")
PODS = kmock.resource("", "v1", "pods")
PDBS = kmock.resource("policy", "v1", "poddisruptionbudgets")
LEASES = kmock.resource("coordination.k8s.io", "v1", "leases")
ENDPOINTSLICES = kmock.resource("discovery.k8s.io", "v1", "endpointslices")
RESOURCES = {
    LLMD: kmock.ResourceInfo(kind=c.KIND, namespaced=True, shortnames={"llmd"},
                             subresources={"status", "scale"}),
    DEPLOYMENTS: kmock.ResourceInfo(kind="Deployment", namespaced=True, subresources={"status"}),
    SERVICES: kmock.ResourceInfo(kind="Service", namespaced=True, subresources={"status"}),
    PODS: kmock.ResourceInfo(kind="Pod", namespaced=True, subresources={"status"}),
    PDBS: kmock.ResourceInfo(kind="PodDisruptionBudget", namespaced=True,
                             subresources={"status"}),
    kmock.resource("", "v1", "events"): kmock.ResourceInfo(kind="Event", namespaced=True),
    LEASES: kmock.ResourceInfo(kind="Lease", namespaced=True),
    ENDPOINTSLICES: kmock.ResourceInfo(kind="EndpointSlice", namespaced=True),
    # Kopf's backbone waits for these to be discoverable even with scanning disabled.
    kmock.resource("", "v1", "namespaces"): kmock.ResourceInfo(kind="Namespace", namespaced=False),
    kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions"):
        kmock.ResourceInfo(kind="CustomResourceDefinition", namespaced=False),
}
VERBS = {"list", "watch", "get", "create", "patch", "update", "delete"}
REPO = Path(__file__).resolve().parents[2]
K8S_VERSIONS = ("1.30", "1.37")
"""Kubernetes versions whose real schemas (kubernetes-validate, strict) every object must pass."""


def llmd_body(name: str = "llama", **spec: Any) -> dict[str, Any]:
    """An LLMDeployment in namespace ``ml``; ``spec`` entries override the TP=2 default."""
    base: dict[str, Any] = {
        "model": {"uri": "hf://meta-llama/Llama-2-7b-chat-hf"},
        "engine": {"tensorParallelSize": 2},
        "replicas": 1,
    }
    base.update(spec)
    return {
        "apiVersion": c.API_VERSION, "kind": c.KIND,
        "metadata": {"name": name, "namespace": NS}, "spec": base,
    }


def live_body(name: str = "llama", generation: int = 1, **spec: Any) -> dict[str, Any]:
    """``llmd_body`` as the API server would hand it out (uid, generation)."""
    body = llmd_body(name, **spec)
    body["metadata"].update(uid=f"uid-{name}", generation=generation, resourceVersion="1")
    return body


@pytest.fixture
def example_cr() -> dict[str, Any]:
    return yaml.safe_load((REPO / "manifests/examples/llmdeployment.yaml").read_text())


class Cluster:
    """Test-side access to the emulator: plain HTTP for writes, its memory for reads."""

    def __init__(self, emulator: MetrolineEmulator, server: kmock.Server) -> None:
        self.emulator, self.server = emulator, server

    async def call(self, method: str, path: str, body: Any = None,
                   content_type: str = "application/merge-patch+json") -> dict[str, Any]:
        headers = {"Content-Type": content_type}
        data = None if body is None else json.dumps(body)
        async with self.server.client.request(method, path, data=data, headers=headers) as resp:
            payload = await resp.json()
            assert resp.status < 400, payload
            return payload

    def path(self, resource: kmock.resource, name: str | None = None, sub: str = "") -> str:
        base = "/api/v1" if resource.group == "" else f"/apis/{resource.group}/{resource.version}"
        path = f"{base}/namespaces/{NS}/{resource.plural}"
        return path + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    def get(self, resource: kmock.resource, name: str) -> dict[str, Any] | None:
        key = (resource, NS, name)
        if key not in self.emulator.objects or self.emulator.objects[key].deleted:
            return None
        return copy.deepcopy(self.emulator.objects[key].raw)

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 60.0) -> Any:
        """Poll until ``predicate()`` is truthy; return its value. ``timeout`` only catches a
        stall (far above what any step takes on an idle machine), never a speed."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {predicate}")
            await asyncio.sleep(0.02)

    def requests_to(self, method: str, fragment: str) -> list[kmock.Request]:
        return [r for r in self.emulator
                if r.method.value == method and fragment in r.url.path]


@pytest_asyncio.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with MetrolineEmulator() as emulator, kmock.Server(emulator) as server:
        for resource, info in RESOURCES.items():
            info.verbs = set(VERBS)
            emulator.resources[resource] = info
        yield Cluster(emulator, server)


class FakeEngine:
    """Serves ``/metrics`` like an engine pod, with a settable KV-cache gauge."""

    def __init__(self) -> None:
        self.kv = 0.42
        self.port = 0

    async def metrics(self, _: aiohttp.web.Request) -> aiohttp.web.Response:
        text = (f"# TYPE {c.KV_METRIC} gauge\n"
                f'{c.KV_METRIC}{{model_name="llama"}} {self.kv}\n')
        return aiohttp.web.Response(text=text)


@pytest_asyncio.fixture
async def fake_engine() -> AsyncIterator[FakeEngine]:
    engine = FakeEngine()
    app = aiohttp.web.Application()
    app.router.add_get(c.METRICS_PATH, engine.metrics)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    engine.port = runner.addresses[0][1]
    yield engine
    await runner.cleanup()


@pytest_asyncio.fixture
async def operator(
    cluster: Cluster, fake_engine: FakeEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Controller]:
    """The real operator (kopf + controller) logged in through a kubeconfig to the emulator."""
    async with run_operator(cluster, fake_engine, tmp_path, monkeypatch) as controller:
        yield controller


class FakeClock:
    """A monotonic clock for the leader election that moves only by ``advance``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class PartitionableClient(KubeClient):
    """A KubeClient whose requests to paths containing ``cut`` fail as a lost connection does
    (a network partition between this one replica and the API server)."""

    cut: str | None = None

    async def _call(self, method: str, path: str, params: Any, body: Any,
                    content_type: str) -> tuple[int, dict[str, Any]]:  # fmt: skip
        if self.cut is not None and self.cut in path:
            raise ApiError(0, "ClientConnectorError", f"partitioned from {path}")
        return await super()._call(method, path, params, body, content_type)


LEASE_DURATION_S = 15
"""On the ``FakeClock``: advancing it by more expires a lease that nobody renews."""


@contextlib.asynccontextmanager
async def run_operator(
    cluster: Cluster, fake_engine: FakeEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    *, instance: str = "operator-0", clock: FakeClock | None = None,
    client: KubeClient | None = None,
) -> AsyncIterator[Controller]:
    """Run one operator process's worth (kopf + a fresh controller, electing itself on the
    Lease as ``instance``) until the block ends."""
    kubeconfig = {
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(cluster.server.url)}}],
        "users": [{"name": "kmock", "user": {"token": "test"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
    }
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    config = OperatorConfig(
        engine_image="registry.test/engine:1", metrics_port=fake_engine.port,
        kv_interval_s=0.1, backoff=Backoff(base_s=0.05, cap_s=0.4, jitter=0.0),
        instance=instance, lease_namespace=NS, lease_duration_s=LEASE_DURATION_S,
        lease_renew_deadline_s=10, lease_retry_period_s=0.1,
        activator_port=0, pod_ip="127.0.0.1",  # the activator on any free port of this host
    )
    client = client or KubeClient(timeout_s=5)
    elector = LeaderElector(client, config, monotonic=clock or FakeClock())
    controller = Controller(client, config, elector=elector)
    # The operator gets its own thread and event loop, as it would have its own process: kopf
    # cancels every task of its loop when it stops, which must not include the test's tasks.
    stop, ready = threading.Event(), threading.Event()
    coro = kopf.operator(
        registry=build_registry(controller), clusterwide=True, standalone=True,
        stop_flag=stop, ready_flag=ready,
    )
    thread = threading.Thread(target=asyncio.run, args=(coro,), name="operator", daemon=True)
    thread.start()
    assert await asyncio.to_thread(ready.wait, 10), "operator did not start"
    try:
        yield controller
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 10)
    assert not thread.is_alive(), "operator did not stop"


class Engine:
    """A tiny engine pod for the activator's tests: /v1/completions streams three chunks and
    echoes what it got."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    async def completions(self, request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        self.seen.append({"path": request.path_qs, "body": await request.json(),
                          "headers": dict(request.headers)})  # fmt: skip
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                       "X-Engine": "pod-0"})  # fmt: skip
        await response.prepare(request)
        for part in ("alpha", "beta", "gamma"):
            await response.write(f"data: {part}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response


@pytest_asyncio.fixture
async def engine() -> AsyncIterator[tuple[Engine, int]]:
    fake = Engine()
    app = aiohttp.web.Application()
    app.router.add_post("/v1/completions", fake.completions)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    await aiohttp.web.TCPSite(runner, "127.0.0.1", 0).start()
    yield fake, runner.addresses[0][1]
    await runner.cleanup()
