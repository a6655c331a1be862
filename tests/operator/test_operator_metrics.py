"""The operator's own Prometheus metrics (issue 14, item 6): the real operator against the
emulator, read over HTTP from its /metrics; the entry point serving them on their own port
(0: not at all); the setting, the manifest's port and the docs' PodMonitor agreeing.

Nothing waits on a duration: the tests poll for counts (with the harness's generous timeouts),
and compare the histogram with the counters only after the operator has stopped.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from metroline.operator import constants as c
from metroline.operator import main as entry
from metroline.operator.config import OWN_METRICS_PORT, OperatorConfig
from metroline.operator.metrics import KINDS, RESULTS, MetricsServer

from .conftest import DEPLOYMENTS, REPO, SERVICES, Cluster, llmd_body, run_operator
from .test_manifests import one
from .test_operator_flow import create, play_deployment_controller, status

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
UNREACHABLE_POD = {"phase": "Running", "podIP": "127.0.0.2",  # nothing listens there
                   "conditions": [{"type": "Ready", "status": "True"}]}  # fmt: skip


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get(("metroline_operator_" + name, frozenset(labels.items())), 0.0)


async def scrape(port: int) -> Samples:
    async with aiohttp.ClientSession() as session, \
            session.get(f"http://127.0.0.1:{port}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return parse(await response.text())


async def scrape_until(port: int, predicate: Any, timeout: float = 30.0) -> Samples:
    """Scrape until ``predicate(samples)`` holds; the last samples."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        samples = await scrape(port)
        if predicate(samples):
            return samples
        assert asyncio.get_running_loop().time() < deadline, "metrics never got there"
        await asyncio.sleep(0.05)


def counted(samples: Samples) -> bool:
    results = {result: value(samples, "reconciles_total", result=result) for result in RESULTS}
    return (results["ok"] >= 2 and results["invalid_spec"] >= 1 and results["forbidden"] == 1
            and results["apply_failed"] >= 1 and results["error"] >= 1
            and value(samples, "kv_scrape_failures_total") >= 1)  # fmt: skip


@pytest.mark.asyncio
async def test_the_operator_counts_every_reconcile_outcome_on_its_metrics_endpoint(
    cluster: Cluster, fake_engine, tmp_path, monkeypatch
):
    # One of each outcome: a 503 on llama's Service (apply_failed), a 403 and a 409 on gated's
    # children (forbidden, and error: a conflict is retried without a word in status), an
    # invalid spec; each failure once, then the retry goes through (ok).
    cluster.emulator.fail("PATCH", "/services/llama$", 503)
    cluster.emulator.fail("PATCH", "/deployments/gated$", 403)
    cluster.emulator.fail("PATCH", "/services/gated$", 409)
    server: MetricsServer | None = None
    try:
        async with run_operator(cluster, fake_engine, tmp_path, monkeypatch) as operator:
            server = MetricsServer(operator.metrics.registry, 0, "127.0.0.1")
            before = await scrape(server.port)
            assert all(("metroline_operator_reconciles_total", frozenset({("result", r)}))
                       in before for r in RESULTS)  # every series exists from the start, at 0
            assert all(value(before, "applies_total", kind=k) == 0 for k in KINDS)
            await create(cluster, llmd_body())
            await create(cluster, llmd_body("gated"))
            await create(cluster, llmd_body("bad", engine={"tensorParallelSize": 2,
                                                           "extraArgs": ["--port", "9000"]}))
            await cluster.wait_for(lambda: all(cluster.get(kind, name)
                                               for kind in (DEPLOYMENTS, SERVICES)
                                               for name in ("llama", "gated")))  # fmt: skip
            await cluster.wait_for(lambda: status(cluster, "bad").get("phase") == "Failed")
            # A ready pod whose /metrics cannot be reached: a KV scrape failure.
            await play_deployment_controller(cluster, ready=1, pod_status=UNREACHABLE_POD)
            samples = await scrape_until(server.port, counted)
            assert value(samples, "api_errors_total", code="503") == 1
            assert value(samples, "api_errors_total", code="403") == 1
            assert value(samples, "api_errors_total", code="409") == 1
            assert value(samples, "applies_total", kind="Deployment") >= 2
            assert value(samples, "applies_total", kind="Service") >= 2
            assert value(samples, "applies_total", kind="PodDisruptionBudget") == 0  # 1 replica
            assert ("metroline_operator_work_queue_depth", frozenset()) in samples
            assert cluster.get(DEPLOYMENTS, "bad") is None
        # The operator has stopped, nothing counts any more: the histogram holds one
        # observation per counted reconcile.
        samples = await scrape(server.port)
        total = sum(value(samples, "reconciles_total", result=result) for result in RESULTS)
        assert total >= 6
        assert value(samples, "reconcile_duration_seconds_count") == total
        assert value(samples, "reconcile_duration_seconds_bucket", le="+Inf") == total
    finally:
        if server is not None:
            await asyncio.to_thread(server.close)


# The entry point, the setting, the install and the docs.


class RecordedServer(MetricsServer):
    """A MetricsServer on a free loopback port, remembering the port main() asked for."""

    made: list[RecordedServer] = []

    def __init__(self, registry: Any, port: int, addr: str = "0.0.0.0") -> None:
        super().__init__(registry, 0, "127.0.0.1")
        self.asked, self.closed = port, False
        RecordedServer.made.append(self)

    def close(self) -> None:
        super().close()
        self.closed = True


def test_main_serves_the_operators_metrics_while_kopf_runs(monkeypatch):
    RecordedServer.made.clear()
    pages: list[str] = []

    def run(**kwargs: Any) -> None:  # kopf.run: the operator's whole life
        (server,) = RecordedServer.made
        assert not server.closed and "liveness_endpoint" in kwargs
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            pages.append(response.read().decode())

    monkeypatch.setenv("METROLINE_OPERATOR_METRICS_PORT", "9181")
    monkeypatch.setattr(entry, "MetricsServer", RecordedServer)
    monkeypatch.setattr(entry.kopf, "run", run)
    entry.main([])
    (server,) = RecordedServer.made
    assert server.asked == 9181 and server.closed  # on the configured port, until kopf ends
    samples = parse(pages[0])
    assert value(samples, "reconciles_total", result="ok") == 0
    assert ("metroline_operator_work_queue_depth", frozenset()) in samples


def test_a_metrics_port_of_0_serves_nothing(monkeypatch):
    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("no metrics server with METROLINE_OPERATOR_METRICS_PORT=0")

    ran: list[bool] = []
    monkeypatch.setenv("METROLINE_OPERATOR_METRICS_PORT", "0")
    monkeypatch.setattr(entry, "MetricsServer", refuse)
    monkeypatch.setattr(entry.kopf, "run", lambda **_: ran.append(True))
    entry.main([])
    assert ran == [True]


def test_the_operators_metrics_port_is_its_own_setting():
    default = OperatorConfig.from_env({})
    assert default.own_metrics_port == OWN_METRICS_PORT == 8081
    assert default.metrics_port == c.HTTP_PORT  # still the engine pods' port
    config = OperatorConfig.from_env({"METROLINE_OPERATOR_METRICS_PORT": "9100",
                                      "METROLINE_METRICS_PORT": "9000"})
    assert (config.own_metrics_port, config.metrics_port) == (9100, 9000)
    assert OperatorConfig.from_env({"METROLINE_OPERATOR_METRICS_PORT": "0"}).own_metrics_port == 0
    for bad in ({"METROLINE_OPERATOR_METRICS_PORT": "70000"},
                {"METROLINE_OPERATOR_METRICS_PORT": "8080"}):  # kopf's /healthz
        with pytest.raises(ValueError, match="METROLINE_OPERATOR_METRICS_PORT"):
            OperatorConfig.from_env(bad)


def test_the_manifest_and_the_docs_pod_monitor_name_the_metrics_port():
    dep = one("Deployment")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    configured = int(env.get("METROLINE_OPERATOR_METRICS_PORT", OWN_METRICS_PORT))
    assert ports["metrics"] == configured and ports["health"] != configured
    docs = (REPO / "docs/operator.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", docs, re.S)]
    (monitor,) = [b for b in blocks if isinstance(b, dict) and b.get("kind") == "PodMonitor"]
    assert monitor["metadata"]["namespace"] == dep["metadata"]["namespace"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["podMetricsEndpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "30s"}]
