"""The small parts: quantities, URIs, spec checks, drift, backoff, the work queue, metrics
parsing, the cache, and the API client's error mapping (against the emulator over HTTP)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from fractions import Fraction

import aiohttp.web
import kopf
import pytest

from metroline.operator import constants as c
from metroline.operator.backoff import Backoff
from metroline.operator.cache import ClusterCache
from metroline.operator.checks import check_spec
from metroline.operator.drift import covers
from metroline.operator.kube import ApiError, KubeClient
from metroline.operator.kvmetrics import parse_kv_usage
from metroline.operator.modeluri import parse_model_uri
from metroline.operator.quantity import parse_quantity
from metroline.operator.workqueue import WorkQueue

from .conftest import DEPLOYMENTS, llmd_body


@pytest.mark.parametrize(("text", "value"), [
    (4, Fraction(4)), ("500m", Fraction(1, 2)), ("32Gi", Fraction(32 * 2**30)),
    ("1.5", Fraction(3, 2)), ("1e3", Fraction(1000)), ("2k", Fraction(2000)), ("1.", Fraction(1)),
    ("1e-3", Fraction(1, 1000)), ("+.5", Fraction(1, 2)), ("1.5e99", None), ("1e100", None),
    ("1e10000000", None), ("1" * 10_000, None), ("-1", None), ("lots", None), (-1, None),
])
def test_quantities(text, value):
    """Values as Kubernetes reads them; ValueError outside the bounds (tests/operator/
    test_admission.py checks that the bounds are checked before any arithmetic)."""
    if value is None:
        with pytest.raises(ValueError):
            parse_quantity(text)
    else:
        assert parse_quantity(text) == value


def test_model_uris():
    hf = parse_model_uri("hf://Qwen/Qwen3-8B@refs/pr/1")
    assert (hf.scheme, hf.repo, hf.revision) == ("hf", "Qwen/Qwen3-8B", "refs/pr/1")
    assert hf.local_path == "/var/cache/metroline/models/Qwen--Qwen3-8B--refs--pr--1"
    assert parse_model_uri("hf://a/b@x/y").local_path != parse_model_uri("hf://a/b@x--y").local_path
    pvc = parse_model_uri("pvc://weights")
    assert (pvc.claim, pvc.local_path) == ("weights", "/mnt/model")
    assert pvc.default_served_name == "model"
    assert parse_model_uri("/models/llama/").default_served_name == "llama"
    with pytest.raises(ValueError, match=r"\.\."):
        parse_model_uri("pvc://weights/../etc")


@pytest.mark.parametrize(("name", "spec", "needle"), [
    ("1llama", {}, "DNS-1035"),
    ("x" * 64, {}, "DNS-1035"),
    ("llama", {"engine": {"extraArgs": ["--tensor-parallel-size=4"]}}, "--tensor-parallel-size"),
    ("llama", {"env": [{"name": "HF_TOKEN", "value": "x"}]}, "HF_TOKEN"),
    ("llama", {"env": [{"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"}]},
     "NVIDIA_VISIBLE_DEVICES"),
    ("llama", {"resources": {"limits": {"memory": "3Gi"}}}, "/dev/shm"),
    ("llama", {"resources": {"limits": {"memory": "1e10000000"}}}, "memory"),
    ("llama", {"podLabels": {c.LABEL_INSTANCE: "other"}}, c.LABEL_INSTANCE),
    ("llama", {"resources": {"requests": {"memory": "64Gi"}, "limits": {"memory": "32Gi"}}},
     "exceeds"),
    ("llama", {"model": {"uri": "pvc://w/../x"}}, ".."),
    ("llama", {"engine": {"extraArgs": ["-tp4"]}}, "unrecognized arguments: -tp4"),
    ("llama", {"engine": {"extraArgs": ["--drain-timeout", "1e308"]}}, "--drain-timeout"),
])
def test_invalid_specs_are_invalid_spec_for_the_operator_too(name, spec, needle):
    body = llmd_body(**spec)
    problems = check_spec(name, body["spec"]).problems
    assert problems and any(needle in p for p in problems), problems


def test_drift_detection():
    desired = {"spec": {"replicas": 2, "template": {"containers": [{"name": "e", "args": ["a"]}]},
                        "limits": {"cpu": "4"}, "on": True}}
    live = {"spec": {"replicas": 2, "template": {"containers": [{"name": "e", "args": ["a"],
                                                                 "imagePullPolicy": "Always"}]},
                     "limits": {"cpu": 4}, "on": True}, "status": {}}
    assert covers(desired, live)
    assert not covers(desired, {**live, "spec": {**live["spec"], "replicas": 5}})
    assert not covers({"x": [1, 2]}, {"x": [1]})
    assert not covers({"on": True}, {"on": "True"})


def test_backoff_grows_to_a_cap_and_jitter_only_shortens():
    backoff = Backoff(base_s=1, factor=2, cap_s=60, jitter=0.2)
    assert [backoff.delay(n, rng=lambda: 0.0) for n in (1, 2, 3, 7, 50)] == [1, 2, 4, 60, 60]
    assert backoff.delay(3, rng=lambda: 1.0) == pytest.approx(3.2)


@pytest.mark.asyncio
async def test_work_queue_dedupes_serialises_and_delays():
    queue: WorkQueue[str] = WorkQueue()
    queue.add("a")
    queue.add("a")
    queue.add("b")
    assert len(queue) == 2
    key = await queue.get()
    queue.add(key)  # while processing: remembered, not handed out twice
    assert await queue.get() == "b"
    queue.done("b")
    assert len(queue) == 0
    queue.done(key)
    assert await asyncio.wait_for(queue.get(), 1) == key
    queue.done(key)
    queue.add_after("c", 10.0)
    queue.add_after("c", 0.05)  # the earlier timer wins (a wide gap: a loaded CI may stall)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await asyncio.wait_for(queue.get(), 8) == "c"
    assert loop.time() - started < 8
    queue.close()
    with pytest.raises(asyncio.CancelledError):
        await queue.get()


def test_kv_metric_parsing():
    text = (
        "# HELP metroline:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
        "# TYPE metroline:kv_cache_usage_perc gauge\n"
        'metroline:kv_cache_usage_perc{model_name="a"} 0.25\n'
        'metroline:kv_cache_usage_perc{model_name="b"} 0.75 1700000000000\n'
        'metroline:num_requests_running{model_name="a"} 3\n'
    )
    assert parse_kv_usage(text) == 0.5
    assert parse_kv_usage("metroline:kv_cache_usage_perc 7\n") == 1.0  # clamped
    assert parse_kv_usage("up 1\n") is None


def test_cache_keys_children_by_owner_and_pods_by_label():
    cache = ClusterCache()
    owner = {"apiVersion": c.API_VERSION, "kind": c.KIND, "name": "llama", "controller": True}
    dep = {"kind": "Deployment", "metadata": {"name": "x", "namespace": "ml",
                                              "resourceVersion": "5", "ownerReferences": [owner]}}
    assert cache.put_child(dep) == ("ml", "llama")
    stale = {**dep, "metadata": {**dep["metadata"], "resourceVersion": "4"}, "spec": "old"}
    cache.put_child(stale)
    assert "spec" not in cache.child(("ml", "llama"), "Deployment")  # a late event is ignored
    assert cache.put_child({"kind": "Deployment", "metadata": {"name": "y"}}) is None
    labels = {c.LABEL_MANAGED_BY: c.MANAGED_BY, c.LABEL_INSTANCE: "llama"}
    pod = {"metadata": {"name": "p", "namespace": "ml", "labels": labels}}
    assert cache.put_pod(pod) == ("ml", "llama") and len(cache.pods(("ml", "llama"))) == 1
    cache.put_pod(pod, deleted=True)
    assert cache.pods(("ml", "llama")) == []


@pytest.mark.asyncio
async def test_api_client_maps_errors(cluster):
    client = KubeClient(timeout_s=5)
    client.connect(kopf.ConnectionInfo(server=str(cluster.server.url)))
    try:
        cluster.emulator.fail("PATCH", "/deployments/x$", 429, retry_after=7)
        with pytest.raises(ApiError) as error:
            await client.request("PATCH", cluster.path(DEPLOYMENTS, "x"), body={})
        assert error.value.status == 429 and error.value.retryable
        assert error.value.retry_after == 7
        with pytest.raises(ApiError) as error:
            await client.request("PATCH", cluster.path(DEPLOYMENTS, "x"), body={})
        assert error.value.status == 404 and not error.value.retryable
        await client.delete("apps/v1", "Deployment", "ml", "x")  # absent is fine
        client.connect(kopf.ConnectionInfo(server="http://127.0.0.1:9"))
        with pytest.raises(ApiError) as error:
            await client.request("GET", "/api")
        assert error.value.status == 0 and error.value.retryable
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_api_client_turns_a_timeout_into_a_retryable_error():
    release = asyncio.Event()

    async def slow(_: aiohttp.web.Request) -> aiohttp.web.Response:
        await release.wait()  # answers only after the client gave up
        return aiohttp.web.json_response({})

    app = aiohttp.web.Application()
    app.router.add_route("*", "/{tail:.*}", slow)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    client = KubeClient(timeout_s=0.2)
    client.connect(kopf.ConnectionInfo(server=f"http://127.0.0.1:{runner.addresses[0][1]}"))
    try:
        with pytest.raises(ApiError) as error:
            await client.apply({"apiVersion": "v1", "kind": "Service",
                                "metadata": {"name": "x", "namespace": "ml"}})
        assert error.value.status == 0 and error.value.retryable
    finally:
        release.set()
        await client.close()
        await runner.cleanup()


def test_the_operator_never_imports_torch():
    code = ("import sys, metroline.operator.main, metroline.operator.crd; "
            "assert 'torch' not in sys.modules and 'metroline.engine' not in sys.modules")
    subprocess.run([sys.executable, "-P", "-c", code], check=True, timeout=60)
