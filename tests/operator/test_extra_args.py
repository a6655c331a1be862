"""engine.extraArgs as `metroline serve` will read them (operator/managedflags.py
``read_serve_args``, operator/checks.py, operator/pod.py): garbled flags refused, values that
start with '-' read as argparse reads them, ``$(VAR)`` expanded as the kubelet does, and a
``--drain-timeout`` that the grace period can cover. tests/operator/test_engine_cli.py checks the
same against the engine's own parser."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metroline.operator import constants as c
from metroline.operator.checks import check_spec
from metroline.operator.managedflags import (
    UNSEEN,
    Unseen,
    managed_flag,
    managed_flag_regex,
    read_serve_args,
)
from metroline.operator.pod import (
    GRACE_MARGIN_S,
    MAX_DRAIN_TIMEOUT_S,
    PRE_STOP_SLEEP_S,
    drain_timeout_s,
    expand_refs,
    pod_spec,
)

from .conftest import llmd_body

SECRET_ENV = {"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}


def problems(extra: list[str], env: list[dict[str, Any]] | None = None) -> tuple[str, ...]:
    spec: dict[str, Any] = {"engine": {"tensorParallelSize": 2, "extraArgs": extra}}
    if env is not None:
        spec["env"] = env
    return check_spec("llama", llmd_body(**spec)["spec"]).problems


def grace(extra: list[str], env: list[dict[str, Any]] | None = None) -> int:
    spec: dict[str, Any] = {"engine": {"tensorParallelSize": 2, "extraArgs": extra}}
    if env is not None:
        spec["env"] = env
    check = check_spec("llama", llmd_body(**spec)["spec"])
    assert check.spec is not None and check.location is not None, check.problems
    return pod_spec(check.spec, check.location, "e:1")["terminationGracePeriodSeconds"]


@pytest.mark.parametrize(("extra", "needle"), [
    (["-tp4"], "unrecognized arguments: -tp4"),  # crash-looped the pod before
    (["-t=4"], "unrecognized arguments: -t=4"),
    (["--api-key", "-x"], "argument --api-key: expected one argument"),
    (["--api-key", "--port"], "--port"),  # argparse reads --port as the flag, not a value
    (["--enforce-eager", "1"], "unrecognized arguments: 1"),
    (["--enforce-eager=1"], "ignored explicit argument"),
    (["--seed", "x"], "invalid int value: 'x'"),
    (["--log-level", "loud"], "invalid choice: 'loud'"),
    (["--max-num", "8"], "--max-num"),  # ambiguous; the CRD's rule names a managed match
    (["--help"], "--help"),
    (["--", "x"], "unrecognized arguments: -- x"),
    (["--port\n"], "unrecognized arguments"),
    (["-t", "4"], "-tp"),  # a prefix of the single-dash -tp
    (["--api-key", "a\x00b"], "NUL"),
])
def test_what_the_engine_refuses_is_invalid_spec(extra, needle):
    found = problems(extra)
    assert found and any(needle in p for p in found), found


def test_a_value_that_argparse_reads_as_a_flag_gets_a_hint():
    (problem,) = problems(["--api-key", "-x"])
    assert "--api-key=-x" in problem


@pytest.mark.parametrize("extra", [
    ["--api-key=--port"], ["--api-key=-x"], ["--api-key", "-1"], ["--api-key", "-x y"],
    ["--api-key", "$(API_KEY)"], ["--api-key=$(API_KEY)"], ["--drain", "60"], ["--seed=-1"],
    ["--enforce-eager"], ["--no-enforce-eager", "--log-format", "json"], ["--log-l", "debug"],
    ["--kv-cache-memory-bytes", "-1"], [],
])
def test_what_the_engine_takes_passes(extra):
    assert problems(extra) == ()


def test_the_single_dash_prefix_is_a_managed_flag_for_the_crd_too():
    assert managed_flag("-t") == "-tp" and managed_flag("-tp=4") == "-tp"
    assert managed_flag("-t=4") is None and managed_flag("-tp4") is None
    regex = managed_flag_regex()
    assert re.search(regex, "-t") and re.search(regex, "-tp=4")
    assert not re.search(regex, "-t=4") and not re.search(regex, "-tp4")


def test_reading_records_each_flag_as_written():
    reading = read_serve_args(["/m", "--tensor-par", "2", "-tp=4", "--no-enable-prefix"])
    assert reading.error is None
    assert reading.calls == (("--tensor-parallel-size", "--tensor-parallel-size"),
                             ("--tensor-parallel-size", "-tp"),
                             ("--enable-prefix-caching", "--no-enable-prefix-caching"))
    assert reading.values["tensor_parallel_size"] == 4
    assert reading.values["enable_prefix_caching"] is False


# --- $(VAR) references -----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expanded"), [
    ("$(A)", "1"), ("x$(A)y$(B)", "x1y-2"), ("$$(A)", "$(A)"), ("$$$(A)", "$1"),
    ("$(NOPE)", "$(NOPE)"), ("$()", "$()"), ("$(A", "$(A"), ("$A", "$A"), ("a$", "a$"),
    ("$", "$"), ("$$", "$"), ("$(A)$", "1$"), ("(A)", "(A)"),
])
def test_references_expand_as_the_kubelet_does(text, expanded):
    assert expand_refs(text, {"A": "1", "B": "-2"}) == expanded


def test_extra_args_are_judged_after_expansion():
    env = [{"name": "TP", "value": "4"}, {"name": "NEG", "value": "-x"},
           {"name": "SEED", "value": "$(TP)2"}]
    assert problems(["--seed", "$(SEED)"], env) == ()  # 42
    assert any("-tp4" in p for p in problems(["-tp$(TP)"], env))
    assert any("expected one argument" in p for p in problems(["--api-key", "$(NEG)"], env))
    assert any("invalid int value: '$(NOPE)'" in p for p in problems(["--seed", "$(NOPE)"], env))
    assert grace(["--drain-timeout", "$(TP)"], env) == PRE_STOP_SLEEP_S + 4 + GRACE_MARGIN_S


def test_values_the_operator_cannot_see_pass_types_and_choices():
    env = [SECRET_ENV]
    assert problems(["--seed", "$(API_KEY)", "--log-level", "$(API_KEY)"], env) == ()
    reading = read_serve_args(["/m", "--seed", f"{UNSEEN}S{UNSEEN}"])
    assert reading.error is None and isinstance(reading.values["seed"], Unseen)
    (problem,) = problems(["--drain-timeout", "$(API_KEY)"], env)
    assert "--drain-timeout must be a number the operator can read" in problem


# --- the drain timeout and the grace period ----------------------------------------------------


@pytest.mark.parametrize("value", ["1e308", "inf", "-inf", "nan", "-1", "-0.5",
                                   str(MAX_DRAIN_TIMEOUT_S + 1), "1e400"])
def test_a_drain_timeout_the_grace_period_cannot_cover_is_invalid_spec(value):
    for extra in (["--drain-timeout", value], [f"--drain-timeout={value}"], ["--drain", value]):
        found = problems(extra)
        assert found and any(("--drain-timeout" in p and str(MAX_DRAIN_TIMEOUT_S) in p)
                             or "expected one argument" in p for p in found), (extra, found)


@pytest.mark.parametrize(("value", "seconds"), [
    ("0", 0), ("1e-400", 0), ("0.5", 1), ("60", 60),
    (str(MAX_DRAIN_TIMEOUT_S), MAX_DRAIN_TIMEOUT_S),
])
def test_the_grace_period_covers_a_valid_drain(value, seconds):
    assert problems([f"--drain-timeout={value}"]) == ()
    assert grace([f"--drain-timeout={value}"]) == PRE_STOP_SLEEP_S + seconds + GRACE_MARGIN_S


@settings(max_examples=200, deadline=None)
@given(extra=st.lists(st.sampled_from(["--drain-timeout", "--drain", "--drain-timeout=1e308",
                                       "--drain-timeout=nan", "--seed"])
                      | st.floats(allow_nan=True).map(repr) | st.text(max_size=5), max_size=6))
def test_the_rendered_grace_period_is_always_bounded(extra):
    """Whatever extraArgs hold, the pod's grace period is a bounded int (int64 seconds)."""
    drain = drain_timeout_s(extra)
    assert math.isfinite(drain) and 0 <= drain <= MAX_DRAIN_TIMEOUT_S
    if not problems(extra):
        assert grace(extra) <= PRE_STOP_SLEEP_S + MAX_DRAIN_TIMEOUT_S + GRACE_MARGIN_S
    assert drain_timeout_s([]) == c.ENGINE_DRAIN_TIMEOUT_S
