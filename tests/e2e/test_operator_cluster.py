"""The operator against a real cluster (kind or k3d), when METROLINE_E2E_KUBECONFIG is set.

    kind create cluster --name metroline
    kind get kubeconfig --name metroline > /tmp/kind.kubeconfig
    METROLINE_E2E_KUBECONFIG=/tmp/kind.kubeconfig .venv/bin/python -P -m pytest tests/e2e -q

The operator runs in-process with the kubeconfig's credentials (like `kopf run` on a laptop);
the CRD is applied from crds/. A cluster without GPUs is the interesting case: the real
scheduler refuses the pods for lack of nvidia.com/gpu, and status must say so.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

KUBECONFIG = os.environ.get("METROLINE_E2E_KUBECONFIG")
pytestmark = pytest.mark.skipif(not KUBECONFIG, reason="METROLINE_E2E_KUBECONFIG is not set")
REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120


def kubectl(
    *args: str, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or "kubectl"
    return subprocess.run([binary, "--kubeconfig", str(KUBECONFIG), *args], input=stdin,
                          capture_output=True, text=True, check=check, timeout=TIMEOUT_S)


def get(kind: str, name: str, namespace: str, *flags: str) -> dict[str, Any] | None:
    done = kubectl("get", kind, name, "-n", namespace, "-o", "json", *flags, check=False)
    return json.loads(done.stdout) if done.returncode == 0 else None


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def llmd(name: str, namespace: str, **spec: Any) -> str:
    body = {"apiVersion": "serving.metroline.dev/v1alpha1", "kind": "LLMDeployment",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"model": {"uri": "hf://meta-llama/Llama-2-7b-chat-hf"},
                     "engine": {"tensorParallelSize": 2}, **spec}}
    return json.dumps(body)


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == kind:
            return cond
    return {}


@pytest.fixture(scope="module")
def namespace() -> Iterator[str]:
    kubectl("apply", "--server-side", "-f", str(REPO / "crds/llmdeployments.yaml"))
    kubectl("wait", "--for=condition=Established", "--timeout=60s",
            "crd/llmdeployments.serving.metroline.dev")
    name = f"metroline-e2e-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def operator(namespace: str) -> Iterator[None]:
    import kopf

    from metroline.operator.config import OperatorConfig
    from metroline.operator.controller import Controller
    from metroline.operator.handlers import build_registry
    from metroline.operator.kube import KubeClient

    os.environ["KUBECONFIG"] = str(KUBECONFIG)
    controller = Controller(KubeClient(), OperatorConfig(kv_interval_s=5))
    stop, ready = threading.Event(), threading.Event()
    coro = kopf.operator(registry=build_registry(controller), clusterwide=True, standalone=True,
                         stop_flag=stop, ready_flag=ready)
    thread = threading.Thread(target=asyncio.run, args=(coro,), daemon=True)
    thread.start()
    assert ready.wait(60), "operator did not start"
    yield
    stop.set()
    thread.join(30)


def test_lifecycle_on_a_real_cluster(namespace: str, operator: None) -> None:
    kubectl("apply", "-f", "-", stdin=llmd("llama", namespace))
    dep = wait_for(lambda: get("deployment", "llama", namespace), "the Deployment")
    engine = dep["spec"]["template"]["spec"]["containers"][0]
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == "2"
    svc = wait_for(lambda: get("service", "llama", namespace), "the Service")
    assert svc["spec"]["ports"][0]["name"] == "http" and svc["spec"]["ports"][0]["port"] == 8000
    # kubectl (1.21+) prints managedFields only when asked to.
    managed = get("deployment", "llama", namespace, "--show-managed-fields")
    assert managed is not None
    managers = {(f["manager"], f["operation"]) for f in managed["metadata"]["managedFields"]}
    assert ("metroline-operator", "Apply") in managers

    # Without GPUs the real scheduler refuses the pod; status must say Degraded, in its words.
    def degraded_or_scheduled() -> bool:
        obj = get("llmdeployment", "llama", namespace)
        cond = condition(obj, "Degraded")
        return cond.get("status") == "True" or (obj or {}).get("status", {}).get("replicas")
    wait_for(degraded_or_scheduled, "a status that reflects the pods")
    cond = condition(get("llmdeployment", "llama", namespace), "Degraded")
    if cond.get("status") == "True":
        assert cond["reason"] == "Unschedulable" and "nvidia.com/gpu" in cond["message"]

    # Changing TP rolls the Deployment.
    kubectl("patch", "llmdeployment", "llama", "-n", namespace, "--type=merge",
            "-p", json.dumps({"spec": {"engine": {"tensorParallelSize": 4}}}))
    wait_for(lambda: get("deployment", "llama", namespace)["spec"]["template"]["spec"]
             ["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4", "TP=4")
    wait_for(lambda: get("llmdeployment", "llama", namespace)["status"]
             ["observedGeneration"] == 2, "observedGeneration 2")

    # The scale subresource: kubectl scale, then a PodDisruptionBudget appears.
    kubectl("scale", "llmdeployment/llama", "-n", namespace, "--replicas=2")
    wait_for(lambda: get("deployment", "llama", namespace)["spec"]["replicas"] == 2, "2 replicas")
    wait_for(lambda: get("poddisruptionbudget", "llama", namespace), "the PDB")
    table = kubectl("get", "llmd", "-n", namespace).stdout
    assert all(col in table for col in ("MODEL", "TP", "REPLICAS", "READY", "KV", "PHASE"))

    # A deleted child is repaired.
    kubectl("delete", "service", "llama", "-n", namespace)
    wait_for(lambda: get("service", "llama", namespace), "the Service to come back")

    # Deleting the LLMDeployment removes everything (owner references, real GC).
    kubectl("delete", "llmdeployment", "llama", "-n", namespace)
    wait_for(lambda: get("deployment", "llama", namespace) is None, "garbage collection")


def test_invalid_specs(namespace: str, operator: None) -> None:
    refused = kubectl("apply", "-f", "-", check=False,
                      stdin=llmd("bad", namespace, engine={"tensorParallelSize": 3}))
    assert refused.returncode != 0 and "tensorParallelSize" in refused.stderr
    kubectl("apply", "-f", "-",
            stdin=llmd("odd", namespace, engine={"tensorParallelSize": 2,
                                                 "extraArgs": ["--port", "9000"]}))
    wait_for(lambda: condition(get("llmdeployment", "odd", namespace), "Ready")
             .get("reason") == "InvalidSpec", "InvalidSpec")
    cond = condition(get("llmdeployment", "odd", namespace), "Ready")
    assert cond["status"] == "False" and "--port" in cond["message"]
    assert get("deployment", "odd", namespace) is None
