"""Validation at admission (issue 14, item 1): CEL rules with Kubernetes' quantity library,
typed affinity, tolerations and nodeSelector; the operator's own checks as a second line with
the same verdicts and bounded cost. Bounded quantities (the schema, the operator's parser, the
harness's quantity library) are in ``test_admission_quantities.py``.

Nothing here measures time: bounds are asserted on what the code computes (which strings reach
a parser, which powers are raised), never on how long it takes.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import kubernetes_validate
import pytest
import re2
from hypothesis import given, settings
from hypothesis import strategies as st

from metroline.operator import constants as c
from metroline.operator.checks import check_spec
from metroline.operator.crd import kubernetes_definitions
from metroline.operator.modeluri import parse_model_uri
from metroline.operator.pod import volumes
from metroline.operator.quantity import parse_quantity
from metroline.operator.schema import to_structural
from metroline.operator.spec import (
    K8S_SCHEMA_VERSION,
    MANAGED_FLAGS,
    LLMDeploymentSpec,
    managed_flag,
    managed_flag_regex,
    shm_bytes,
)

from .conftest import K8S_VERSIONS, llmd_body
from .crd_validation import crd, defaulted, openapi_schema, validate_cr


def _body(name: str = "llama", **spec: Any) -> dict[str, Any]:
    return llmd_body(name, **spec)


def _resources(**parts: dict[str, Any]) -> dict[str, Any]:
    return {"resources": parts}


def _both(body: dict[str, Any]) -> tuple[list[str], tuple[str, ...]]:
    """(the API server's errors, the operator's problems) for one object."""
    return validate_cr(body), check_spec(body["metadata"]["name"],
                                         defaulted(body)["spec"]).problems


# --- the committed CRD -------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_committed_crd_is_a_crd_kubernetes_accepts(version):
    assert kubernetes_validate.validate(crd(), version, strict=True)


# --- CEL rules: requests, limits and /dev/shm --------------------------------------------------


@pytest.mark.parametrize(("requests", "limits", "refused"), [
    ({"memory": "64Gi"}, {"memory": "32Gi"}, "memory"),
    ({"memory": "32Gi"}, {"memory": "32Gi"}, None),
    ({"cpu": 5}, {"cpu": "4500m"}, "cpu"),
    ({"cpu": "4"}, {"cpu": 4}, None),
    ({"cpu": "1001m"}, {"cpu": "1"}, "cpu"),
    ({"ephemeral-storage": "1e9"}, {"ephemeral-storage": "1G"}, None),
    ({"ephemeral-storage": "1Gi"}, {"ephemeral-storage": "1G"}, "ephemeral-storage"),
    ({"cpu": "1.1n"}, {"cpu": "1.05n"}, None),  # both are 2n once rounded, as in Kubernetes
    ({"memory": "9Ei"}, {"memory": "8Ei"}, None),  # both capped at 2^63-1
    ({"cpu": "2", "memory": "1Gi"}, {"cpu": "1"}, "cpu"),
])
def test_requests_above_limits_are_refused_by_cel_and_by_the_operator(requests, limits,
                                                                        refused):
    errors, problems = _both(_body(**_resources(requests=requests, limits=limits)))
    if refused is None:
        assert errors == [] and problems == ()
        return
    assert errors == [f".spec.resources: requests.{refused} exceeds limits.{refused}; lower "
                      "the request or raise the limit"], errors  # from CEL, nothing else
    assert len(problems) == 1 and f"requests.{refused}" in problems[0] and "exceeds" in problems[0]


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_shm_above_the_memory_limit_is_refused(tp):
    """/dev/shm is 2 GiB per GPU and counts against the pod's memory."""
    exact = f"{2 * tp}Gi"
    below = str(2 * tp * 2**30 - 1)
    for memory, ok in ((exact, True), (below, False), (f"{2 * tp * 1024 + 1}Mi", True)):
        body = _body(engine={"tensorParallelSize": tp}, **_resources(limits={"memory": memory}))
        errors, problems = _both(body)
        assert (errors == []) is ok and (problems == ()) is ok, (memory, errors, problems)
        if not ok:
            assert all("/dev/shm" in e for e in errors) and "/dev/shm" in problems[0]
    unlimited = _body(engine={"tensorParallelSize": tp}, **_resources(requests={"memory": "1"}))
    assert _both(unlimited) == ([], ())


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_the_shm_rule_and_the_rendered_volume_agree(tp):
    check = check_spec("llama", _body(engine={"tensorParallelSize": tp})["spec"])
    assert check.spec is not None and check.location is not None
    dshm = next(v for v in volumes(check.spec, check.location) if v["name"] == "dshm")
    assert parse_quantity(dshm["emptyDir"]["sizeLimit"]) == shm_bytes(tp)


# --- CEL rules: env, flags, paths, the name ----------------------------------------------------


@pytest.mark.parametrize("name", sorted(c.RESERVED_ENV))
def test_reserved_env_is_refused_by_the_crd_and_by_check_spec(name):
    body = _body(env=[{"name": "OK", "value": "1"}, {"name": name, "value": "all"}])
    errors, problems = _both(body)
    assert errors and all("env may not set" in e for e in errors), errors
    assert len(problems) == 1 and f"spec.env sets {name}," in problems[0], problems


def test_gpu_isolation_env_is_reserved():
    assert {"NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES",
            "NVIDIA_DRIVER_CAPABILITIES"} <= c.RESERVED_ENV


@pytest.mark.parametrize(("args", "flag"), [
    (["--port=9000"], "--port"), (["-tp", "4"], "-tp"), (["--tensor-parallel", "4"], "--tensor"),
    (["--enforce-eager", "--max-num-seqs", "8"], "--max-num-seqs"), (["--h"], "--h"),
    (["--api-key", "$(KEY)"], None), (["--seed=1"], None),
])
def test_managed_flags_in_extra_args_are_refused(args, flag):
    """(Garbled flags such as ``-tp4`` pass the CRD and are refused by check_spec, which reads
    the whole command line as the engine does: tests/operator/test_extra_args.py.)"""
    errors, problems = _both(_body(engine={"extraArgs": args}))
    if flag is None:
        assert errors == [] and problems == ()
        return
    assert errors and all("engine.extraArgs sets a flag" in e for e in errors), errors
    assert len(problems) == 1 and flag in problems[0], problems


@pytest.mark.parametrize(("args", "flag", "instead"), [
    (["--revision", "v2"], "--revision", "write the revision into model.uri, hf://org/name@"),
    (["--rev=v2"], "--rev", "write the revision into model.uri"),
    (["--config", "/etc/serve.yaml"], "--config", "put the flags in engine.extraArgs"),
])
@pytest.mark.parametrize("uri", ["hf://org/model@v1", "pvc://weights/model", "/models/m"])
def test_revision_and_config_in_extra_args_are_refused(args, flag, instead, uri):
    """The operator renders the model as a local directory (an hf:// model downloaded into
    one), where ``metroline serve`` refuses ``--revision`` at start: a crash loop otherwise;
    flags in a ``--config`` file would pass unchecked (managed ones, --drain-timeout)."""
    errors, problems = _both(_body(model={"uri": uri}, engine={"extraArgs": args}))
    assert errors and all("hf://org/name@revision; a --config file's flags in engine.extraArgs"
                          in e for e in errors), errors
    assert len(problems) == 1 and flag in problems[0] and instead in problems[0], problems
    assert "use the matching spec field" not in problems[0]


@settings(max_examples=400, deadline=None)
@given(arg=st.one_of(
    st.sampled_from(sorted(MANAGED_FLAGS)).flatmap(
        lambda f: st.tuples(st.integers(1, len(f)), st.sampled_from(["", "=", "=4", "x", "\n"]))
        .map(lambda t: f[:t[0]] + t[1])),
    st.text(alphabet="-=abcdeghiklmnoprstuvxyz\n4", max_size=30),
))
def test_the_cel_flag_regex_is_managed_flag(arg):
    assert (re2.search(managed_flag_regex(), arg) is not None) is (managed_flag(arg) is not None)


@pytest.mark.parametrize(("uri", "refused"), [
    ("pvc://weights/../etc", True), ("/models/..", True), ("/../x", True),
    ("hf://org/name@a/../b", True), ("/models/..x/y", False), ("/models/x../y", False),
    ("hf://org/name@v..1", False), ("pvc://weights/a..b", False),
])
def test_dot_dot_segments_are_refused(uri, refused):
    errors, problems = _both(_body(model={"uri": uri}))
    assert bool(errors) is refused and bool(problems) is refused, (errors, problems)
    try:
        parse_model_uri(uri)
        parses = True
    except ValueError:
        parses = False
    assert parses is not refused  # the CEL rule, its twin and modeluri agree


@pytest.mark.parametrize(("name", "ok"), [
    ("llama", True), ("a", True), ("a-1", True), ("x" * 63, True), ("1llama", False),
    ("llama.v2", False), ("Llama", False), ("llama-", False), ("x" * 64, False),
])
def test_the_name_must_be_a_dns_1035_label(name, ok):
    errors, problems = _both(_body(name))
    assert (errors == []) is ok and (problems == ()) is ok, (errors, problems)
    if not ok:
        assert any("DNS-1035" in e for e in errors) and any("DNS-1035" in p for p in problems)


# --- typed affinity, tolerations, nodeSelector -------------------------------------------------

AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{
            "matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In",
                                  "values": ["NVIDIA-H100-80GB-HBM3"]}],
            "matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["n1"]}],
        }]},
        "preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 10, "preference": {"matchExpressions": [
                {"key": "zone", "operator": "Exists"}]}}],
    },
    "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
        "topologyKey": "kubernetes.io/hostname", "namespaces": ["ml"],
        "labelSelector": {"matchExpressions": [
            {"key": "app.kubernetes.io/instance", "operator": "In", "values": ["llama"]}]},
        "namespaceSelector": {"matchLabels": {"team": "ml"}},
    }]},
    "podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
        "weight": 1, "podAffinityTerm": {"topologyKey": "zone"}}]},
}


def test_a_typed_affinity_is_accepted_and_reaches_the_pod():
    body = _body(affinity=AFFINITY, tolerations=[{"key": "a", "operator": "Exists"}],
                 nodeSelector={"gpu": "h100"})
    assert _both(body) == ([], ())
    spec = LLMDeploymentSpec.model_validate(body["spec"])
    assert spec.affinity == AFFINITY


@pytest.mark.parametrize(("path", "key", "value", "needle"), [
    ((), "nodeAfinity", {}, "nodeAfinity"),
    (("nodeAffinity",), "requiredDuringScheduling", {}, "requiredDuringScheduling"),
    (("podAntiAffinity", "requiredDuringSchedulingIgnoredDuringExecution", 0), "topologykey",
     "x", "topologykey"),
    (("podAntiAffinity", "requiredDuringSchedulingIgnoredDuringExecution", 0, "labelSelector"),
     "matchLabel", {"a": "b"}, "matchLabel"),
    (("nodeAffinity", "preferredDuringSchedulingIgnoredDuringExecution", 0), "weight", "ten",
     "weight"),
    (("nodeAffinity", "requiredDuringSchedulingIgnoredDuringExecution", "nodeSelectorTerms", 0,
      "matchExpressions", 0), "values", "H100", "values"),
])
def test_a_misspelt_or_mistyped_affinity_is_refused_by_the_schema(path, key, value, needle):
    affinity = copy.deepcopy(AFFINITY)
    node: Any = affinity
    for part in path:
        node = node[part]
    node[key] = value
    errors = validate_cr(_body(affinity=affinity))
    assert errors and any(needle in e for e in errors), errors


@pytest.mark.parametrize(("spec", "needle"), [
    ({"tolerations": [{"key": "a", "operator": "Exists", "effects": "NoSchedule"}]}, "effects"),
    ({"tolerations": [{"key": "a", "tolerationSeconds": "30"}]}, "tolerationSeconds"),
    ({"nodeSelector": {"gpu": 1}}, "gpu"),
    ({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {}}}},
     "nodeSelectorTerms"),  # required in the Kubernetes type
])
def test_tolerations_and_node_selector_are_typed(spec, needle):
    errors = validate_cr(_body(**spec))
    assert errors and any(needle in e for e in errors), errors


def test_the_typed_schemas_are_generated_from_the_kubernetes_openapi():
    """Not hand-written: the CRD's affinity is kubernetes-validate's PodSpec.affinity of the
    CRD's oldest Kubernetes, $refs inlined; every field it admits exists in the newest too."""
    spec = openapi_schema()["properties"]["spec"]["properties"]
    definitions = kubernetes_definitions(K8S_SCHEMA_VERSION)
    marker = {"type": "object", "properties": {"affinity": {
        "type": "object", "x-metroline-k8s-schema": "io.k8s.api.core.v1.PodSpec/affinity"}}}
    generated = to_structural(marker, {}, kubernetes=definitions)["properties"]["affinity"]
    assert spec["affinity"]["properties"] == generated["properties"]
    latest = kubernetes_validate.utils.latest_version()
    newest = kubernetes_definitions(".".join(latest.split(".")[:2]))

    def fields(node: dict[str, Any], defs: dict[str, Any], seen: tuple = ()) -> set[str]:
        out = set()
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            return set() if name in seen else fields(defs[name], defs, (*seen, name))
        for key, sub in (node.get("properties") or {}).items():
            out |= {key} | {f"{key}.{f}" for f in fields(sub, defs, seen)}
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                out |= {f"[].{f}" for f in fields(node[key], defs, seen)}
        return out

    pod = "io.k8s.api.core.v1.PodSpec"
    for field in ("affinity", "tolerations", "nodeSelector"):
        old = fields(definitions[pod]["properties"][field], definitions)
        new = fields(newest[pod]["properties"][field], newest)
        assert old <= new, sorted(old - new)


def test_the_crd_stays_small():
    assert len(json.dumps(crd(), separators=(",", ":"))) < 64 * 1024  # last-applied fits too


# --- CEL and the operator agree ----------------------------------------------------------------

QUANTITY_TEXT = st.one_of(
    st.integers(-1, 2**64),
    st.from_regex(r"\+?[0-9]{1,30}(\.[0-9]{0,10})?([KMGTPE]i|[numkMGTPE]|[eE]-?[0-9]{1,3})?",
                  fullmatch=True),
    st.sampled_from(["1e10000000", "1" * 40, "lots", "1e1.5", "-1", "2Gi", "16Gi", "500m"]),
)


@settings(max_examples=60, deadline=None)
@given(tp=st.sampled_from([1, 2, 4, 8]),
       requests=st.dictionaries(st.sampled_from(["cpu", "memory", "ephemeral-storage"]),
                                QUANTITY_TEXT, max_size=3),
       limits=st.dictionaries(st.sampled_from(["cpu", "memory", "ephemeral-storage"]),
                              QUANTITY_TEXT, max_size=3))
def test_crd_and_operator_agree_on_resources(tp, requests, limits):
    """The CEL rules and their Python twins give the same verdict on any resources, and no
    rule ever hands quantity() an unbounded string (validate_cr would raise)."""
    body = _body(engine={"tensorParallelSize": tp},
                 **_resources(requests=requests, limits=limits))
    errors, problems = _both(body)
    assert (errors == []) is (problems == ()), (errors, problems)
