"""``spec.routing``: the InferencePool the operator renders, validated against the Gateway API
Inference Extension's real CRD (``data/gateway-api-inference-extension/``); admission of the
routing fields (CRD and operator agree); the pool tracker's reaction to a cluster without the
CRD; and what the endpoint picker reads from the engine (metrics, prefix-cache hashes), checked
against the engine's own code and docs/operator.md."""

from __future__ import annotations

import asyncio
import hashlib
import re
import struct
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from metroline.engine.config import CacheConfig
from metroline.engine.core.kv_cache import block_hash, root_hash
from metroline.engine.server.metrics import ServerMetrics
from metroline.operator import constants as c
from metroline.operator.checks import check_spec
from metroline.operator.drift import covers
from metroline.operator.kube import ApiError
from metroline.operator.render import render_children, unwanted_children
from metroline.operator.routing import (
    CRD_NOT_INSTALLED,
    PICKER_METRIC_FLAGS,
    POOL_KIND,
    InferencePools,
)
from metroline.operator.workqueue import WorkQueue

from .conftest import NS, REPO, FakeClock, live_body
from .crd_validation import validate_against, validate_cr
from .emulator_crd import CRD_FILES, admit, schemas, undeclared

GIE_SCHEMA = schemas()["inference.networking.k8s.io/v1", POOL_KIND][1]
ROUTED = {"inferencePool": True, "endpointPicker": {"name": "llama-epp"}}
KEY = (NS, "llama")


def rendered(**spec: Any) -> dict[str, dict[str, Any]]:
    body = live_body(**spec)
    check = check_spec("llama", body["spec"])
    assert check.valid, check.problems
    return {obj["kind"]: obj for obj in render_children(body, check, "registry.test/engine:1")}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def test_the_crd_copy_is_the_extensions_v1_with_its_licence():
    folder = CRD_FILES[0].parent
    crd = yaml.safe_load(CRD_FILES[0].read_text())
    assert (crd["spec"]["group"], crd["spec"]["names"]["kind"]) == (
        "inference.networking.k8s.io",
        "InferencePool",
    )
    assert [v["name"] for v in crd["spec"]["versions"]] == ["v1"]
    assert "Apache License" in (folder / "LICENSE").read_text()
    assert "84436a96b9e6ce2b59ddacd3d04c31b4fbd442de" in (folder / "README.md").read_text()


@pytest.mark.parametrize(
    "picker",
    [
        {"name": "llama-epp"},
        {"name": "epp", "port": 9102, "failureMode": "FailOpen"},
        {"name": "e" * 63, "port": 1},
    ],
)
def test_rendered_pools_pass_the_extensions_crd(picker):
    children = rendered(routing={"inferencePool": True, "endpointPicker": picker}, replicas=2)
    pool = children[POOL_KIND]
    assert validate_against(GIE_SCHEMA, pool) == []
    assert undeclared(pool) == []
    ref = pool["spec"]["endpointPickerRef"]
    assert (ref["name"], ref["port"]["number"], ref["failureMode"]) == (
        picker["name"],
        picker.get("port", 9002),
        picker.get("failureMode", "FailClose"),
    )
    assert pool["spec"]["targetPorts"] == [{"number": c.HTTP_PORT}]
    assert (
        pool["metadata"]["ownerReferences"] == children["Deployment"]["metadata"]["ownerReferences"]
    )
    # What the server stores (its defaults added) still covers what was rendered: no re-apply.
    stored, invalid = admit(pool)
    assert invalid is None and stored["spec"]["endpointPickerRef"]["group"] == ""
    assert covers(pool, stored)


def test_the_pool_selects_exactly_the_engine_pods():
    children = rendered(routing=ROUTED, podLabels={"team": "ml"})
    selector = children[POOL_KIND]["spec"]["selector"]["matchLabels"]
    template = children["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert matches(selector, template)
    assert selector[c.LABEL_COMPONENT] == "engine"
    # Not the operator's own pods, nor another component of the same LLMDeployment.
    operator = next(
        d
        for d in yaml.safe_load_all((REPO / "manifests/operator.yaml").read_text())
        if d and d["kind"] == "Deployment"
    )
    assert not matches(selector, operator["spec"]["template"]["metadata"]["labels"])
    assert not matches(selector, {**template, c.LABEL_COMPONENT: "activator"})
    assert not matches(selector, {**template, c.LABEL_INSTANCE: "other"})


def test_no_pool_without_routing_and_a_pool_is_deleted_when_turned_off():
    assert POOL_KIND not in rendered()
    body = live_body()
    kinds = [kind for _, kind, _ in unwanted_children(check_spec("llama", body["spec"]))]
    assert POOL_KIND in kinds
    routed = live_body(routing=ROUTED)
    kinds = [kind for _, kind, _ in unwanted_children(check_spec("llama", routed["spec"]))]
    assert POOL_KIND not in kinds


@pytest.mark.parametrize(
    ("routing", "words"),
    [
        ({"inferencePool": True}, "endpointPicker is required"),
        ({"endpointPicker": {"name": "epp"}}, "used only with routing.inferencePool: true"),
        ({"inferencePool": False, "endpointPicker": {"name": "epp"}}, "used only with"),
        ({"inferencePool": True, "endpointPicker": {"name": "Epp"}}, "name"),
        ({"inferencePool": True, "endpointPicker": {"name": "epp", "port": 0}}, "port"),
        ({"inferencePool": True, "endpointPicker": {"name": "epp", "port": 65536}}, "port"),
        (
            {"inferencePool": True, "endpointPicker": {"name": "epp", "failureMode": "Open"}},
            "failureMode",
        ),
        ({"inferencePool": True, "endpointPicker": {"name": "epp", "extra": 1}}, "extra"),
        ({"inferencePool": "yes"}, "inferencePool"),
    ],
)
def test_the_crd_and_the_operator_refuse_the_same_routing(routing, words):
    body = live_body(routing=routing)
    crd_errors = validate_cr(body)
    problems = check_spec("llama", body["spec"]).problems
    assert any(words in e for e in crd_errors), crd_errors
    assert any(words in p for p in problems), problems


@pytest.mark.parametrize("routing", [{}, {"inferencePool": False}, ROUTED])
def test_the_crd_and_the_operator_accept_the_same_routing(routing):
    body = live_body(routing=routing)
    assert validate_cr(body) == []
    assert check_spec("llama", body["spec"]).valid


# The tracker: a cluster without the CRD.


def missing(tracker: InferencePools, queue: WorkQueue | None = None) -> bool:
    desired = rendered(routing=ROUTED)[POOL_KIND]
    error = ApiError(404, "NotFound", "the server could not find the requested resource")
    return tracker.crd_missing(KEY, desired, error, queue)


def test_a_404_marks_the_crd_missing_and_the_pool_waits_for_the_recheck():
    clock = FakeClock()
    tracker = InferencePools(monotonic=clock, recheck_s=60)
    check = check_spec("llama", live_body(routing=ROUTED)["spec"])
    assert tracker.state(KEY, check, None)[:2] == ("False", "Pending")
    deployment = {"kind": "Deployment"}
    other = ApiError(404, "NotFound", "deployments not found")
    assert not tracker.crd_missing(KEY, deployment, other, None)  # only the pool's kind
    assert not tracker.crd_missing(KEY, {"kind": POOL_KIND}, ApiError(403, "Forbidden", ""), None)
    assert missing(tracker)
    status, reason, message = tracker.state(KEY, check, None)
    assert (status, reason) == ("False", CRD_NOT_INSTALLED)
    assert "could not find the requested resource" in message and "install" in message
    children = rendered(routing=ROUTED)
    assert POOL_KIND not in {k["kind"] for k in tracker.to_apply(KEY, list(children.values()))}
    clock.advance(30)
    assert POOL_KIND in {k["kind"] for k in tracker.to_apply(KEY, list(children.values()))}
    # The pool appears (the CRD was installed): applied, and kopf does not watch it.
    pool = admit(children[POOL_KIND])[0]
    status, reason, message = tracker.state(KEY, check, pool)
    assert (status, reason) == ("True", "PoolApplied") and "restart" in message
    assert "Service llama-epp port 9002 (FailClose)" in message


def test_routing_turned_off_clears_the_mark_and_the_condition():
    tracker = InferencePools(monotonic=FakeClock())
    assert missing(tracker)
    assert tracker.state(KEY, check_spec("llama", live_body()["spec"]), None) is None
    check = check_spec("llama", live_body(routing=ROUTED)["spec"])
    assert tracker.state(KEY, check, None)[1] == "Pending"


@pytest.mark.asyncio
async def test_a_404_queues_the_recheck():
    queue: WorkQueue = WorkQueue()
    tracker = InferencePools(recheck_s=0.01)
    assert missing(tracker, queue)
    assert len(queue) == 0
    assert await asyncio.wait_for(queue.get(), 10) == KEY


# What the picker reads from the engine.


def test_the_engine_exports_every_metric_the_picker_is_pointed_at():
    metrics = ServerMetrics("llama", max_model_len=4096)
    metrics.set_cache_config(CacheConfig(16, 0.9, True, None), num_blocks=512)
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    for flag, name in PICKER_METRIC_FLAGS.items():
        if flag == "--lora-info-metric":
            assert name == "" and not any("lora" in family for family in families)
            continue
        assert name in families, flag
        assert families[name].type == "gauge", flag
        assert all("model_name" in s.labels for s in families[name].samples)
    info = families[PICKER_METRIC_FLAGS["--cache-info-metric"]].samples[0].labels
    assert (info["block_size"], info["num_gpu_blocks"]) == ("16", "512")
    assert PICKER_METRIC_FLAGS["--kv-cache-usage-percentage-metric"] == c.KV_METRIC


DOCS = (REPO / "docs" / "operator.md").read_text()


def test_the_docs_give_the_picker_flags_the_operator_knows():
    section = DOCS[DOCS.index("## Routing") :]
    for flag, name in PICKER_METRIC_FLAGS.items():
        assert f"{flag}={name}" in section, flag


def test_the_documented_prefix_hash_is_the_engines():
    """docs/operator.md ("Prefix-aware routing") states the block keys; recompute them from the
    documented formula and compare with the engine's own functions."""
    assert 'sha256(b"metroline-kv-root:" + salt)' in DOCS
    assert "sha256(parent || token ids as little-endian int64)" in DOCS
    tokens = list(range(100, 132))
    root = hashlib.sha256(b"metroline-kv-root:").digest()
    first = hashlib.sha256(root + struct.pack("<16q", *tokens[:16])).digest()
    second = hashlib.sha256(first + struct.pack("<16q", *tokens[16:])).digest()
    assert root_hash(None) == root
    assert block_hash(root_hash(None), tokens[:16]) == first
    assert block_hash(first, tokens[16:]) == second


def test_the_docs_picker_config_parses():
    blocks = re.findall(r"```yaml\n(.*?)```", DOCS[DOCS.index("## Routing") :], re.S)
    configs = [
        doc
        for block in blocks
        for doc in yaml.safe_load_all(block)
        if isinstance(doc, dict) and doc.get("kind") == "EndpointPickerConfig"
    ]
    assert configs
    types = {plugin["type"] for plugin in configs[0]["plugins"]}
    assert {"queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer"} <= types


def test_the_operator_may_write_and_watch_inference_pools():
    roles = [
        d
        for d in yaml.safe_load_all((REPO / "manifests/rbac.yaml").read_text())
        if d and d["kind"] == "ClusterRole"
    ]
    verbs = {
        verb
        for rule in roles[0]["rules"]
        for verb in rule["verbs"]
        if "inference.networking.k8s.io" in rule["apiGroups"]
        and "inferencepools" in rule["resources"]
    }
    assert verbs == {"get", "list", "watch", "create", "patch", "delete"}
