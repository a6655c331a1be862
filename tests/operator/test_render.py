"""Rendering: every child of many specs passes the real Kubernetes schemas and keeps the pod
invariants (GPUs = TP, /dev/shm, probes, hardening, owner references)."""

from __future__ import annotations

import math
from typing import Any

import kubernetes_validate
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metroline.operator import constants as c
from metroline.operator.checks import check_spec
from metroline.operator.pod import drain_timeout_s, engine_args
from metroline.operator.render import render_children

from .conftest import K8S_VERSIONS, live_body
from .test_crd import OPAQUE_BUT_WRONG, VALID, _cr


def children(**spec: Any) -> dict[str, dict[str, Any]]:
    body = live_body(**spec)
    check = check_spec("llama", body["spec"])
    assert check.valid, check.problems
    return {obj["kind"]: obj for obj in render_children(body, check, "registry.test/engine:1")}


def pod(rendered: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return rendered["Deployment"]["spec"]["template"]["spec"]


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


SPECS = [_cr(spec)["spec"] for spec in VALID] + [
    {**_cr({})["spec"], "replicas": 4, "model": {"uri": "pvc://claim/models/7b"}},
    {**_cr({})["spec"], "engine": {"tensorParallelSize": 1}, "startupTimeoutSeconds": 61},
]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("spec", SPECS)
def test_every_child_passes_the_real_schemas(spec, version):
    for obj in children(**spec).values():
        assert kubernetes_validate.validate(obj, version, strict=True)


@settings(max_examples=40, deadline=None)
@given(
    tp=st.sampled_from([1, 2, 4, 8]), replicas=st.integers(0, 6),
    startup=st.integers(60, 86_400), threshold=st.floats(0.01, 1.0),
    scheme=st.sampled_from(["hf://org/model@v1", "pvc://claim/dir", "/models/m"]),
    prefix=st.booleans(),
)
def test_pod_invariants(tp, replicas, startup, threshold, scheme, prefix):
    rendered = children(
        engine={"tensorParallelSize": tp, "enablePrefixCaching": prefix}, replicas=replicas,
        startupTimeoutSeconds=startup, readiness={"kvCacheThreshold": threshold},
        model={"uri": scheme},
    )
    spec = pod(rendered)
    engine = spec["containers"][0]
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == str(tp)
    assert engine["command"] == ["metroline", "serve"]
    assert flag(engine["args"], "--tensor-parallel-size") == str(tp)
    assert float(flag(engine["args"], "--ready-kv-threshold")) == threshold
    assert ("--no-enable-prefix-caching" in engine["args"]) is not prefix
    assert flag(engine["args"], "--port") == "8000"
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in engine["volumeMounts"]
    startup_probe = engine["startupProbe"]
    assert startup_probe["httpGet"]["path"] == "/health"
    span = startup_probe["periodSeconds"] * startup_probe["failureThreshold"]
    assert startup <= span < startup + startup_probe["periodSeconds"]
    assert engine["livenessProbe"]["httpGet"]["path"] == "/health"
    assert engine["readinessProbe"]["httpGet"]["path"] == "/ready"
    for container in spec["containers"] + spec.get("initContainers", []):
        hardening = container["securityContext"]
        assert hardening["allowPrivilegeEscalation"] is False
        assert hardening["capabilities"] == {"drop": ["ALL"]}
        assert hardening["runAsNonRoot"] is True and hardening["runAsUser"] != 0
        assert hardening["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["terminationGracePeriodSeconds"] > 5 + c.ENGINE_DRAIN_TIMEOUT_S  # preStop + drain
    assert ("PodDisruptionBudget" in rendered) == (replicas > 1)
    if replicas > 1:  # KV-busy (unready) pods are evicted only within the budget
        assert rendered["PodDisruptionBudget"]["spec"]["unhealthyPodEvictionPolicy"] == \
            "IfHealthyBudget"
    assert rendered["Deployment"]["spec"]["strategy"] == {  # no spare GPU needed by default
        "type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    assert rendered["Deployment"]["spec"]["replicas"] == replicas
    assert rendered["Deployment"]["spec"]["progressDeadlineSeconds"] > startup
    for obj in rendered.values():
        assert obj["metadata"]["ownerReferences"][0]["uid"] == "uid-llama"
        assert obj["metadata"]["labels"][c.LABEL_MANAGED_BY] == c.MANAGED_BY


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_opaque_fields_are_left_to_the_api_server(version):
    """The operator turns the API server's 422 into InvalidSpec (see test_operator_flow)."""
    with pytest.raises(kubernetes_validate.ValidationError, match="anything"):
        kubernetes_validate.validate(children(**OPAQUE_BUT_WRONG)["Deployment"], version, True)


def test_hf_model_downloads_in_an_init_container_with_the_token():
    spec = pod(children(model={"uri": "hf://meta-llama/Llama-2-7b-chat-hf@abc123",
                               "hfTokenSecretRef": {"name": "hf", "key": "tok"}}))
    init = spec["initContainers"][0]
    local = "/var/cache/metroline/models/meta-llama--Llama-2-7b-chat-hf--abc123"
    assert init["command"][:5] == ["hf", "download", "meta-llama/Llama-2-7b-chat-hf",
                                   "--local-dir", local]
    assert flag(init["command"], "--revision") == "abc123"
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "tok"}}} \
        in init["env"]
    assert "nvidia.com/gpu" not in init.get("resources", {}).get("limits", {})
    engine = spec["containers"][0]
    assert engine["args"][0] == local
    assert flag(engine["args"], "--served-model-name") == "meta-llama/Llama-2-7b-chat-hf"
    assert {"name": "cache", "emptyDir": {}} in spec["volumes"]


def test_cache_pvc_keeps_weights_and_pvc_models_mount_read_only():
    spec = pod(children(cache={"claimName": "weights-cache"}))
    assert {"name": "cache", "persistentVolumeClaim": {"claimName": "weights-cache"}} \
        in spec["volumes"]
    spec = pod(children(model={"uri": "pvc://models/llama/7b"}))
    assert "initContainers" not in spec
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} \
        in spec["volumes"]
    assert spec["containers"][0]["args"][0] == "/mnt/model/llama/7b"
    assert flag(spec["containers"][0]["args"], "--served-model-name") == "7b"


def test_engine_flags_follow_the_spec():
    body = live_body(engine={
        "tensorParallelSize": 4, "maxModelLen": 4096, "gpuMemoryUtilization": 0.85,
        "maxNumSeqs": 128, "maxNumBatchedTokens": 4096, "blockSize": 16, "dtype": "bfloat16",
        "extraArgs": ["--api-key", "$(API_KEY)"],
    }, model={"uri": "/models/llama", "servedName": "llama"})
    check = check_spec("llama", body["spec"])
    assert check.spec is not None and check.location is not None
    assert engine_args(check.spec, check.location) == [
        "/models/llama", "--served-model-name", "llama", "--host", "0.0.0.0", "--port", "8000",
        "--tensor-parallel-size", "4", "--ready-kv-threshold", "0.95",
        "--max-model-len", "4096", "--gpu-memory-utilization", "0.85", "--max-num-seqs", "128",
        "--max-num-batched-tokens", "4096", "--block-size", "16", "--dtype", "bfloat16",
        "--api-key", "$(API_KEY)",
    ]


def test_scheduling_and_pod_metadata_pass_through():
    rendered = children(
        nodeSelector={"gpu": "h100"}, priorityClassName="llm",
        tolerations=[{"key": "team", "operator": "Exists"}],
        affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
        podLabels={"team": "ml"}, podAnnotations={"prometheus.io/scrape": "false"},
        env=[{"name": "NCCL_DEBUG", "value": "INFO"}],
    )
    spec = pod(rendered)
    assert spec["nodeSelector"] == {"gpu": "h100"} and spec["priorityClassName"] == "llm"
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert spec["tolerations"][1] == {"key": "team", "operator": "Exists"}
    assert "nodeAffinity" in spec["affinity"]
    template = rendered["Deployment"]["spec"]["template"]["metadata"]
    assert template["labels"]["team"] == "ml"
    assert template["annotations"]["prometheus.io/scrape"] == "false"  # the user's wins
    assert {"name": "NCCL_DEBUG", "value": "INFO"} in spec["containers"][0]["env"]
    selector = rendered["Deployment"]["spec"]["selector"]["matchLabels"]
    assert all(template["labels"][k] == v for k, v in selector.items())
    assert rendered["Service"]["spec"]["selector"] == selector


def test_config_hash_changes_with_any_field_and_only_then():
    hashes = [
        {kind: obj["metadata"]["annotations"][c.ANNOTATION_CONFIG_HASH]
         for kind, obj in children(**spec).items()}
        for spec in ({"nodeSelector": {"gpu": "h100"}}, {"nodeSelector": {"gpu": "h100"}}, {})
    ]
    assert hashes[0] == hashes[1]  # stable: no re-apply without a change
    assert hashes[0]["Deployment"] != hashes[2]["Deployment"]  # a removal changes it
    assert hashes[0]["Service"] == hashes[2]["Service"]  # untouched children are not re-applied


@pytest.mark.parametrize(("extra", "drain"), [
    ([], 30), (["--drain-timeout", "120"], 120), (["--drain-timeout=90.5"], 90.5),
    (["--drain", "200", "--drain-timeout=60"], 60), (["--seed", "7"], 30),
    (["--drain-timeout=3600"], 3600), (["--de", "99"], 30),
])
def test_grace_period_covers_the_drain_that_extra_args_set(extra, drain):
    assert drain_timeout_s(extra) == drain
    grace = pod(children(engine={"tensorParallelSize": 2, "extraArgs": extra}))[
        "terminationGracePeriodSeconds"]
    assert grace >= 5 + drain + 10  # the preStop sleep, the whole drain, time to exit


def test_startup_probe_rounds_up():
    probe = pod(children(startupTimeoutSeconds=1801))["containers"][0]["startupProbe"]
    assert probe["failureThreshold"] == math.ceil(1801 / probe["periodSeconds"])
