"""The generated CRD: no drift from spec.py, valid for Kubernetes, and it accepts exactly the
custom resources the operator's own models accept."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import re2
from hypothesis import given, settings
from hypothesis import strategies as st

from metroline.operator import constants as c
from metroline.operator.checks import check_spec
from metroline.operator.crd import render_crd_yaml

from .conftest import K8S_VERSIONS, llmd_body
from .crd_validation import CRD_PATH, crd, defaulted, openapi_schema, validate_cr


def test_committed_crd_matches_the_models():
    committed = CRD_PATH.read_text()
    assert committed == render_crd_yaml(), (
        "crds/llmdeployments.yaml drifted from operator/spec.py; regenerate it with "
        "`python -P -m metroline.operator.crd crds/llmdeployments.yaml`"
    )


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_crd_is_a_valid_kubernetes_object(version):
    assert kubernetes_validate.validate(crd(), version, strict=True)


def test_crd_names_subresources_and_columns():
    spec = crd()["spec"]
    assert crd()["metadata"]["name"] == "llmdeployments.serving.metroline.dev"
    assert spec["scope"] == "Namespaced" and spec["names"]["shortNames"] == ["llmd"]
    version = spec["versions"][0]
    assert version["subresources"] == {"status": {}, "scale": {
        "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }}
    columns = [col["name"] for col in version["additionalPrinterColumns"]]
    assert columns == ["Model", "TP", "Replicas", "Ready", "KV", "Phase", "Endpoint", "Age"]


def _nodes(schema: dict[str, Any]):
    yield schema
    for sub in (schema.get("properties") or {}).values():
        yield from _nodes(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from _nodes(schema[key])


def test_schema_is_structural_and_patterns_are_re2():
    for node in _nodes(openapi_schema()):
        assert "$ref" not in node and "title" not in node
        assert "type" in node or node.get("x-kubernetes-int-or-string"), node
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string") and "type" not in node
        if "pattern" in node:
            re2.compile(node["pattern"])  # Kubernetes evaluates patterns with Go's RE2


def test_defaults_match_the_models():
    spec = defaulted({"spec": {"model": {"uri": "/models/x"}}})["spec"]
    # No default for replicas: the CRD could not tell a defaulted one from one set beside
    # autoscaling (refused); the operator reads an unset one as 1.
    assert "replicas" not in spec
    assert spec["engine"] == {"tensorParallelSize": 1, "enablePrefixCaching": True}
    assert spec["readiness"] == {"kvCacheThreshold": 0.95}
    assert spec["startupTimeoutSeconds"] == 1800
    assert spec["rollout"] == {"strategy": "RollingUpdate"}
    model = check_spec("x", spec).spec
    assert model is not None and model.fixed_replicas == 1
    assert model.readiness.kv_cache_threshold == 0.95
    assert (model.rollout.strategy, model.rollout.surge, model.rollout.unavailable) == (
        "RollingUpdate", 0, 1)


def test_example_is_accepted(example_cr):
    assert example_cr["apiVersion"] == c.API_VERSION and example_cr["kind"] == c.KIND
    assert validate_cr(example_cr) == []
    assert check_spec(example_cr["metadata"]["name"], example_cr["spec"]).valid
    assert example_cr["spec"]["engine"]["tensorParallelSize"] == 2


VALID = [
    {},
    {"model": {"uri": "pvc://weights/llama/7b"}},
    {"model": {"uri": "/opt/models/qwen3-0.6b", "servedName": "qwen"}},
    {"model": {"uri": "hf://Qwen/Qwen3-8B@main", "hfTokenSecretRef": {"name": "hf"}}},
    {"engine": {"tensorParallelSize": 8, "maxModelLen": 32768, "gpuMemoryUtilization": 1.0,
                "maxNumSeqs": 8, "maxNumBatchedTokens": 8, "blockSize": 32,
                "dtype": "bfloat16", "enablePrefixCaching": False, "extraArgs": ["--seed", "1"]}},
    {"replicas": 0},
    {"resources": {"requests": {"cpu": 4, "memory": "32Gi", "ephemeral-storage": "100G"},
                   "limits": {"cpu": "4500m", "memory": "64Gi"}}},
    {"tolerations": [{"key": "gpu", "operator": "Equal", "value": "a100",
                      "effect": "NoExecute", "tolerationSeconds": 30}]},
    {"env": [{"name": "A", "value": "1"},
             {"name": "B", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
    {"affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
        "weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                           "labelSelector": {"matchLabels": {"a": "b"}}}}]}}},
    {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-H100"]}]}]}}}},
    {"cache": {"claimName": "hf-cache"}, "priorityClassName": "high",
     "podLabels": {"team": "ml"}, "podAnnotations": {"a": "b"}, "nodeSelector": {"gpu": "h100"}},
    {"resources": {"requests": {"cpu": "500m", "memory": "1e10", "ephemeral-storage": "1.5"},
                   "limits": {"cpu": "0.5", "memory": "10G", "ephemeral-storage": "1500m"}}},
    {"engine": {"tensorParallelSize": 8}, "resources": {"limits": {"memory": "16Gi"}}},
    {"engine": {"extraArgs": ["--api-key", "$(API_KEY)", "--enforce-eager"]},
     "env": [{"name": "API_KEY", "value": "x"}, {"name": "NVIDIA_VISIBLE", "value": "y"}]},
    {"rollout": {"maxSurge": 1, "maxUnavailable": 0}},
    {"rollout": {"strategy": "Recreate"}},
    {"rollout": {"maxSurge": "25%", "maxUnavailable": "100%"}, "replicas": 4},
]

OPAQUE_BUT_WRONG = {"affinity": {"nodeAffinity": {"anything": ["checked", "at", "apply"]}}}
"""Not an Affinity: the CRD's typed schema refuses it. The operator itself leaves Affinity to
the API server, so an object stored under an older CRD still reaches the Deployment apply,
which the API server refuses (test_render checks that)."""

INVALID = [
    ({"engine": {"tensorParallelSize": 3}}, "tensorParallelSize"),
    ({"replicas": -1}, "replicas"),
    ({"model": {"uri": "https://example.com/model"}}, "uri"),
    ({"model": {"uri": "hf://just-a-name"}}, "uri"),
    ({"engine": {"gpuMemoryUtilization": 0}}, "gpuMemoryUtilization"),
    ({"engine": {"gpuMemoryUtilization": 1.5}}, "gpuMemoryUtilization"),
    ({"engine": {"blockSize": 12}}, "blockSize"),
    ({"engine": {"dtype": "fp8"}}, "dtype"),
    ({"engine": {"turbo": True}}, "turbo"),
    ({"readiness": {"kvCacheThreshold": 0}}, "kvCacheThreshold"),
    ({"startupTimeoutSeconds": 10}, "startupTimeoutSeconds"),
    ({"resources": {"requests": {"memory": "lots"}}}, "memory"),
    ({"resources": {"requests": {"nvidia.com/gpu": 1}}}, "nvidia.com/gpu"),
    ({"tolerations": [{"operator": "Maybe"}]}, "operator"),
    ({"model": {"uri": "pvc://w/m", "hfTokenSecretRef": {"name": "hf"}}}, "hfTokenSecretRef"),
    ({"engine": {"maxNumSeqs": 512, "maxNumBatchedTokens": 256}}, "maxNumBatchedTokens"),
    ({"engine": {"maxNumSeqs": 9000}}, "maxNumBatchedTokens"),
    ({"env": [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}]},
     "valueFrom"),
    ({"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}, "A"),
    ({"resources": {"limits": {"memory": "1e10000000"}}}, "memory"),
    ({"resources": {"requests": {"cpu": "1" * 10_000}}}, "cpu"),
    ({"resources": {"limits": {"memory": "9999999999999999999"}}}, "memory"),
    ({"resources": {"limits": {"cpu": "-1"}}}, "cpu"),
    ({"resources": {"limits": {"cpu": "1e1.5"}}}, "cpu"),
    ({"resources": {"requests": {"memory": "64Gi"}, "limits": {"memory": "32Gi"}}}, "memory"),
    ({"resources": {"requests": {"ephemeral-storage": "2G"},
                    "limits": {"ephemeral-storage": "1Gi"}}}, "ephemeral-storage"),
    ({"engine": {"tensorParallelSize": 4}, "resources": {"limits": {"memory": "6Gi"}}},
     "/dev/shm"),
    ({"env": [{"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"}]}, "NVIDIA_VISIBLE_DEVICES"),
    ({"env": [{"name": "CUDA_VISIBLE_DEVICES", "value": "0"}]}, "CUDA_VISIBLE_DEVICES"),
    ({"engine": {"extraArgs": ["--port=9000"]}}, "--port"),
    ({"engine": {"extraArgs": ["--tensor-parallel", "4"]}}, "--tensor-parallel-size"),
    ({"model": {"uri": "pvc://weights/../etc"}}, ".."),
    ({"model": {"uri": "/models/../../etc"}}, ".."),
    ({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpresions": []}]}}}}, "matchExpresions"),
    (OPAQUE_BUT_WRONG, "anything"),
    ({"rollout": {"maxSurge": 0, "maxUnavailable": 0}}, "maxUnavailable"),
    ({"rollout": {"maxUnavailable": "0%"}}, "maxUnavailable"),
    ({"rollout": {"strategy": "Recreate", "maxSurge": 1}}, "RollingUpdate"),
    ({"rollout": {"maxUnavailable": "101%"}}, "maxUnavailable"),
    ({"rollout": {"maxSurge": "1"}}, "maxSurge"),
    ({"rollout": {"strategy": "BlueGreen"}}, "strategy"),
]


def _cr(spec: dict[str, Any]) -> dict[str, Any]:
    body = llmd_body()
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(body["spec"].get(key), dict):
            body["spec"][key] = {**body["spec"][key], **value}
        else:
            body["spec"][key] = value
    return body


@pytest.mark.parametrize("spec", VALID)
def test_valid_specs_are_accepted_by_schema_and_operator(spec):
    body = _cr(spec)
    assert validate_cr(body) == []
    assert check_spec("llama", defaulted(body)["spec"]).problems == ()


@pytest.mark.parametrize(("spec", "field"), INVALID)
def test_invalid_specs_are_rejected_by_schema_and_operator(spec, field):
    body = _cr(spec)
    errors = validate_cr(body)
    assert errors and any(field in error for error in errors), errors
    verdict = check_spec("llama", defaulted(body)["spec"])
    if "affinity" in spec:  # the operator leaves Affinity to the API server (the CRD, or 422)
        assert verdict.valid, verdict.problems
        return
    assert not verdict.valid and any(field in p for p in verdict.problems), verdict.problems


@settings(max_examples=60, deadline=None)
@given(
    tp=st.integers(0, 9), replicas=st.integers(-2, 2000), seqs=st.integers(-1, 70_000),
    tokens=st.integers(-1, 1_100_000), memory=st.floats(-0.5, 1.5, allow_nan=False),
    threshold=st.floats(-0.5, 1.5, allow_nan=False), startup=st.integers(0, 100_000),
)
def test_schema_and_models_agree(tp, replicas, seqs, tokens, memory, threshold, startup):
    """Ranges and cross-field rules live twice (CRD and pydantic); they must never differ."""
    body = _cr({
        "engine": {"tensorParallelSize": tp, "maxNumSeqs": seqs, "maxNumBatchedTokens": tokens,
                   "gpuMemoryUtilization": memory},
        "replicas": replicas, "readiness": {"kvCacheThreshold": threshold},
        "startupTimeoutSeconds": startup,
    })
    schema_ok = validate_cr(body) == []
    assert schema_ok == check_spec("llama", defaulted(body)["spec"]).valid
