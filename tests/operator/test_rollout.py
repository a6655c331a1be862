"""GPU-aware rollouts: ``spec.rollout`` in the CRD and the models, the Deployment strategy it
renders, and the PodDisruptionBudget that keeps KV-busy (unready) pods within its budget."""

from __future__ import annotations

import math
from typing import Any

import kubernetes_validate
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metroline.operator import constants as c
from metroline.operator.checks import check_spec
from metroline.operator.render import render_children

from .conftest import K8S_VERSIONS, live_body, llmd_body
from .crd_validation import defaulted, validate_cr


def children(**spec: Any) -> dict[str, dict[str, Any]]:
    body = live_body(**spec)
    check = check_spec("llama", defaulted(body)["spec"])
    assert check.valid, check.problems
    return {obj["kind"]: obj for obj in render_children(body, check, "registry.test/engine:1")}


def verdicts(rollout: dict[str, Any]) -> tuple[list[str], tuple[str, ...]]:
    """What the CRD (kubernetes-validate's schema walk + cel-python) and the operator say."""
    body = llmd_body(rollout=rollout)
    return validate_cr(body), check_spec("llama", defaulted(body)["spec"]).problems


def _int_or_percent(value: int | str) -> int:
    return int(str(value).removesuffix("%"))


def kubernetes_refuses(strategy: dict[str, Any]) -> list[str]:
    """A twin of apps/validation's ValidateDeploymentStrategy (k8s.io/kubernetes), which the
    real schemas in kubernetes-validate cannot express."""
    if strategy["type"] == "Recreate":
        return ["rollingUpdate with Recreate"] if "rollingUpdate" in strategy else []
    update = strategy["rollingUpdate"]
    surge, unavailable = update["maxSurge"], update["maxUnavailable"]
    problems = []
    if isinstance(unavailable, str) and _int_or_percent(unavailable) > 100:
        problems.append("maxUnavailable above 100%")
    if _int_or_percent(surge) == 0 and _int_or_percent(unavailable) == 0:
        problems.append("maxUnavailable may not be 0 when maxSurge is 0")
    return problems


def resolve_fenceposts(surge: int | str, unavailable: int | str, replicas: int) -> tuple[int, int]:
    """A twin of the Deployment controller's ResolveFenceposts: percentages of replicas, surge
    rounded up, unavailability rounded down, and 1 unavailable if both come to 0."""
    def scaled(value: int | str, rounding: Any) -> int:
        return rounding(_int_or_percent(value) * replicas / 100) if isinstance(value, str) \
            else value
    resolved = scaled(surge, math.ceil), scaled(unavailable, math.floor)
    return (resolved[0], 1) if resolved == (0, 0) else resolved


def test_default_rollout_replaces_pods_in_place():
    """No surge pod: a cluster without a spare GPU node still rolls out, one pod at a time."""
    strategy = children(replicas=3)["Deployment"]["spec"]["strategy"]
    assert strategy == {"type": "RollingUpdate",
                        "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    for replicas in (1, 2, 8, 1024):
        surge, unavailable = resolve_fenceposts(0, 1, replicas)
        assert surge == 0 and unavailable == 1  # never more GPUs than replicas x TP


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("rollout", "strategy"), [
    ({"maxSurge": 1, "maxUnavailable": 0},
     {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}),
    ({"maxSurge": 2}, {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 2,
                                                                  "maxUnavailable": 1}}),
    ({"maxSurge": "25%", "maxUnavailable": "50%"},
     {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "50%"}}),
    ({"strategy": "RollingUpdate", "maxUnavailable": "100%"},
     {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": "100%"}}),
    ({"strategy": "Recreate"}, {"type": "Recreate"}),
])
def test_rollout_renders_into_the_deployment_strategy(rollout, strategy, version):
    deployment = children(replicas=4, rollout=rollout)["Deployment"]
    assert deployment["spec"]["strategy"] == strategy
    assert kubernetes_validate.validate(deployment, version, strict=True)
    assert kubernetes_refuses(strategy) == []


def test_switching_to_recreate_drops_rolling_update_and_changes_the_hash():
    """Server-side apply removes the rollingUpdate fields the operator owned, as the API server
    requires with Recreate; the config hash makes the change a drift to apply."""
    rolling, recreate = (children(rollout=r)["Deployment"]
                         for r in ({}, {"strategy": "Recreate"}))
    assert "rollingUpdate" not in recreate["spec"]["strategy"]
    hashes = {obj["metadata"]["annotations"][c.ANNOTATION_CONFIG_HASH] for obj in (rolling,
                                                                                  recreate)}
    assert len(hashes) == 2
    assert rolling["spec"]["template"] == recreate["spec"]["template"]  # no pod change by itself


@pytest.mark.parametrize("rollout", [
    {"maxSurge": 0, "maxUnavailable": 0},
    {"maxUnavailable": 0},  # maxSurge defaults to 0
    {"maxSurge": "0%", "maxUnavailable": 0},
    {"maxSurge": "00%", "maxUnavailable": "0%"},
    {"strategy": "RollingUpdate", "maxSurge": 0, "maxUnavailable": "00%"},
])
def test_both_zero_is_refused_by_the_crd_and_the_operator(rollout):
    crd_errors, problems = verdicts(rollout)
    assert any("may not both be 0" in e for e in crd_errors), crd_errors
    assert problems and all("are both 0" in p for p in problems), problems
    assert "spec.rollout.maxSurge" in problems[0] and "raise one of them" in problems[0]


@pytest.mark.parametrize("rollout", [
    {"strategy": "Recreate", "maxSurge": 1},
    {"strategy": "Recreate", "maxUnavailable": 0},
    {"strategy": "Recreate", "maxSurge": 0, "maxUnavailable": 0},
])
def test_recreate_refuses_rolling_update_parameters(rollout):
    crd_errors, problems = verdicts(rollout)
    assert crd_errors and all("RollingUpdate only" in e for e in crd_errors), crd_errors
    assert problems and all("only strategy RollingUpdate uses" in p for p in problems), problems


@pytest.mark.parametrize(("rollout", "field"), [
    ({"maxUnavailable": "101%"}, "maxUnavailable"), ({"maxSurge": "1000%"}, "maxSurge"),
    ({"maxSurge": -1}, "maxSurge"), ({"maxUnavailable": 1025}, "maxUnavailable"),
    ({"maxSurge": "1"}, "maxSurge"), ({"maxSurge": "x%"}, "maxSurge"),
    ({"maxSurge": True}, "maxSurge"), ({"maxSurge": 1.5}, "maxSurge"),
    ({"strategy": "BlueGreen"}, "strategy"), ({"pause": True}, "pause"),
])
def test_malformed_values_are_refused_by_the_crd_and_the_operator(rollout, field):
    crd_errors, problems = verdicts(rollout)
    assert any(field in e for e in crd_errors), crd_errors
    assert any(field in p for p in problems), problems


@pytest.mark.parametrize("replicas", [2, 5])
def test_pdb_keeps_unready_pods_within_the_budget(replicas):
    """An engine whose KV cache is full answers /ready with 503: a busy pod, not a broken one.
    With IfHealthyBudget a drain evicts it only while the budget holds (AlwaysAllow would
    evict every busy pod at once)."""
    pdb = children(replicas=replicas)["PodDisruptionBudget"]
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "IfHealthyBudget"
    assert pdb["spec"]["maxUnavailable"] == 1
    for version in K8S_VERSIONS:
        assert kubernetes_validate.validate(pdb, version, strict=True)
    assert "PodDisruptionBudget" not in children(replicas=1)


COUNTS = st.one_of(
    st.integers(-1, 3), st.sampled_from([1024, 1025, True, 0.5]),
    st.sampled_from(["0%", "00%", "000%", "5%", "05%", "99%", "100%", "101%", "250%", "999%",
                     "1000%", "1", "", "%", "-5%", "5 %"]),
)


@settings(max_examples=80, deadline=None)
@given(strategy=st.sampled_from([None, "RollingUpdate", "Recreate"]),
       surge=st.none() | COUNTS, unavailable=st.none() | COUNTS, replicas=st.integers(1, 8))
def test_crd_and_models_agree_and_kubernetes_accepts_what_they_accept(
    strategy, surge, unavailable, replicas
):
    rollout = {k: v for k, v in (("strategy", strategy), ("maxSurge", surge),
                                 ("maxUnavailable", unavailable)) if v is not None}
    body = llmd_body(rollout=rollout, replicas=replicas)
    schema_ok = validate_cr(body) == []
    check = check_spec("llama", defaulted(body)["spec"])
    assert schema_ok == check.valid, (validate_cr(body), check.problems)
    if check.valid:
        strategy_out = children(rollout=rollout, replicas=replicas)["Deployment"]["spec"][
            "strategy"]
        assert kubernetes_refuses(strategy_out) == []
        if strategy_out["type"] == "RollingUpdate":
            update = strategy_out["rollingUpdate"]
            extra, down = resolve_fenceposts(update["maxSurge"], update["maxUnavailable"],
                                             replicas)
            assert extra + down > 0  # the rollout can always make progress
