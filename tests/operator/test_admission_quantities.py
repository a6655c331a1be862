"""Validation at admission (issue 14, item 1), quantities: the committed CRD's bounded
quantity schema (pattern, maxLength, range), the operator's ``parse_quantity`` (its cost bounded
whatever the input), and the test harness's port of Kubernetes' quantity parser and CEL quantity
library, checked against Kubernetes' own tables. The CEL rules that use quantities are in
``test_admission.py``.

Nothing here measures time: bounds are asserted on what the code computes (which strings reach
a parser, which powers are raised), never on how long it takes.
"""

from __future__ import annotations

import json
from fractions import Fraction
from typing import Any

import pytest
import re2
from hypothesis import given, settings
from hypothesis import strategies as st

from metroline.operator import quantity
from metroline.operator.quantity import MAX_LENGTH, MAX_VALUE, PATTERN, parse_quantity

from . import crd_validation as cv
from .crd_validation import kubernetes_quantity, openapi_schema
from .test_admission import _body, _both, _resources

HUGE = ["1e10000000", "1e2147483647", "1E+999999999", "1e-10000000", "1" * 10_000,
        "9" * 20, "9" * 29, "1" * 10_000 + "e99999"]


# --- quantities: the committed CRD -------------------------------------------------------------


@pytest.mark.parametrize("text", HUGE)
@pytest.mark.parametrize("where", ["requests", "limits"])
def test_huge_quantities_are_refused_by_the_crd_without_parsing_them(text, where):
    """1e10000000 froze the operator for 29 s and hung the API server's parser. The schema
    refuses it (pattern, maxLength); the CEL rules, which the API server still evaluates after
    a pattern failure, never hand it to quantity() (the harness would raise UnboundedQuantity)."""
    del cv.CALLS[:]
    body = _body(**_resources(**{where: {"memory": text, "cpu": text}}))
    errors, problems = _both(body)
    assert any("memory" in e for e in errors) and any("cpu" in e for e in errors), errors
    assert not any(len(call) > MAX_LENGTH or re2.search(quantity.UNSAFE_EXPONENT, call)
                   for call in cv.CALLS), cv.CALLS
    assert any("memory" in p for p in problems), problems


def test_quantity_schema_bounds_are_in_the_committed_crd():
    requests = openapi_schema()["properties"]["spec"]["properties"]["resources"][
        "properties"]["requests"]["properties"]
    for name in ("cpu", "memory", "ephemeral-storage"):
        node = requests[name]
        assert node["x-kubernetes-int-or-string"] and node["maxLength"] == MAX_LENGTH
        assert node["pattern"] == PATTERN and node["minimum"] == 0
        assert node["maximum"] == MAX_VALUE
        assert re2.search(node["pattern"], "1e99") and not re2.search(node["pattern"], "1e100")


@pytest.mark.parametrize("text", ["1e3", "500m", "32Gi", "1.5", "100G", "0.5", "4", "1Ti",
                                  "1e-3", ".5", "1.", "+2", "8Ei", "9223372036854775807"])
def test_every_quantity_a_cluster_uses_is_accepted(text):
    body = _body(**_resources(requests={"cpu": text}, limits={"cpu": text}))
    errors, problems = _both(body)
    assert errors == [] and problems == ()


# --- quantities: the operator's parser ---------------------------------------------------------


class _Spy:
    """Wraps the module's regex and arithmetic: records what reaches them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.matched: list[int] = []
        self.powers: list[int] = []
        self.exact: list[tuple] = []
        real_regex, real_exact, spy = quantity._QUANTITY, quantity._exact, self

        class Regex:
            def fullmatch(self, text: str) -> Any:
                spy.matched.append(len(text))
                return real_regex.fullmatch(text)

        class PowerFraction(Fraction):
            def __pow__(self, power: Any, modulo: Any = None) -> Any:
                spy.powers.append(int(power))
                return Fraction(self) ** power

        def exact(*args: Any) -> Fraction:
            spy.exact.append(args)
            return real_exact(*args)

        monkeypatch.setattr(quantity, "_QUANTITY", Regex())
        monkeypatch.setattr(quantity, "_exact", exact)
        monkeypatch.setattr(quantity, "Fraction", PowerFraction)


@pytest.mark.parametrize("text", HUGE)
def test_parse_quantity_refuses_huge_inputs_before_any_arithmetic(text, monkeypatch):
    spy = _Spy(monkeypatch)
    with pytest.raises(ValueError):
        parse_quantity(text)
    assert spy.exact == [] or all(abs(args[3]) <= 99 for args in spy.exact)
    assert all(length <= MAX_LENGTH for length in spy.matched)  # the regex never sees more
    assert all(abs(p) <= 99 for p in spy.powers), spy.powers
    if len(text) > MAX_LENGTH or re2.search(quantity.UNSAFE_EXPONENT, text):
        assert spy.exact == [] and spy.powers == []


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="0123456789.eE+-KMGTPEimnuk", max_size=60)
       | st.from_regex(r"[0-9]{1,25}(\.[0-9]{0,12})?[eE][-+]?[0-9]{1,12}", fullmatch=True))
def test_parse_quantity_cost_is_bounded_whatever_the_input(text):
    """Every input either fails the length check or the pattern, or is computed with a power
    of at most 10^99 (2^60 for binary suffixes): the cost cannot grow with the exponent."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        spy = _Spy(monkeypatch)
        try:
            value = parse_quantity(text)
        except ValueError:
            value = None
        assert all(length <= MAX_LENGTH for length in spy.matched)
        assert all(abs(p) <= 99 for p in spy.powers), (text, spy.powers)
        assert len(spy.exact) <= 1
    if value is not None:
        assert 0 <= value <= MAX_VALUE


@settings(max_examples=300, deadline=None)
@given(text=st.from_regex(
    r"\+?[0-9]{0,30}(\.[0-9]{0,11})?([KMGTPE]i|[numkMGTPE]|[eE][-+]?[0-9]{1,3})?",
    fullmatch=True))
def test_parse_quantity_reads_quantities_as_kubernetes_does(text):
    """Within the bounds, the value is resource.ParseQuantity's (the harness's port, checked
    against Kubernetes' own test table below); outside them, the pattern refuses."""
    in_pattern = re2.search(PATTERN, text) is not None
    try:
        value = parse_quantity(text)
    except ValueError:
        value = None
    if not in_pattern:
        assert value is None
        return
    expected = kubernetes_quantity(text)
    assert value == (expected if expected <= MAX_VALUE else None)


def test_parse_quantity_examples():
    assert parse_quantity("0.9n") == Fraction(1, 10**9)  # rounded up to the nano
    assert parse_quantity("8Ei") == MAX_VALUE  # binary suffixes are capped, as Kubernetes does
    assert parse_quantity("1.5Gi") == 1536 * 2**20
    assert parse_quantity(2**63 - 1) == MAX_VALUE
    assert parse_quantity("9223372036854775807000000000n") == MAX_VALUE  # as Kubernetes writes it
    for bad in (-1, 2**63, True, "-1", " 1", "1 ", "1e1.5", "1e100", "0.1234567891",
                "12345678901234567890", "9223372036854775808", "Mi", "1,5", "1" * 29 + "n"):
        with pytest.raises(ValueError):
            parse_quantity(bad)


# --- the harness's quantity library is Kubernetes' ---------------------------------------------

KUBERNETES_VALUES = {
    # resource.ParseQuantity's expectations (apimachinery quantity_test.go, TestQuantityParse).
    "0": 0, "0n": 0, "0Ki": 0, "1": 1, "1Ki": 1024, "7Mi": 7 * 2**20, "3Ei": 3 * 2**60,
    "5n": Fraction(5, 10**9), "4u": Fraction(4, 10**6), "3m": Fraction(3, 1000), "50k": 50_000,
    "1E": 10**18, "1E-3": Fraction(1, 1000), "1E18": 10**18, "100.035k": 100_035,
    "0.0005k": Fraction(1, 2), "0.5e-2": Fraction(5, 1000), "1.3E+6": 1_300_000,
    "1.7E18": 17 * 10**17, "6.987654321G": 6_987_654_321, "1.01E": 101 * 10**16,
    "3.001n": Fraction(4, 10**9), "1.1E-9": Fraction(2, 10**9),
    "0.0000000001": Fraction(1, 10**9), "0.00000012345": Fraction(124, 10**9),
    "9Ei": 2**63 - 1, "9223372036854775807Ki": 2**63 - 1, "12E": 12 * 10**18,
    "100.035Ki": Fraction(10243584, 100), "0.05Gi": Fraction(536870912, 10),
    "0.000000000001Ki": Fraction(2, 10**9), ".001": Fraction(1, 1000), "1.": 1,
    "1.G": 10**9, ".": 0, "-.": 0, "-1.025Ti": -Fraction(1025, 1000) * 2**40,
}
KUBERNETES_INVALID = ["", "1.1.M", "1+1.0M", "0.1mi", "0.1am", "aoeu", ".5i", "1i", "-3.01i",
                      "-3.01e-", " 1", "1 ", "200K", "Three", "1,3G", "1e99999999999999999999"]
"""ParseQuantity's invalid table and the CEL library's examples ("Mi", which the library's
comment calls an error, is left out: the parser's code reads a missing number as 0)."""


@pytest.mark.parametrize(("text", "value"), KUBERNETES_VALUES.items())
def test_harness_parses_as_kubernetes(text, value):
    assert kubernetes_quantity(text) == value


@pytest.mark.parametrize("text", KUBERNETES_INVALID)
def test_harness_refuses_what_kubernetes_refuses(text):
    with pytest.raises(ValueError):
        kubernetes_quantity(text)
    result = cv.evaluate(f"isQuantity({json.dumps(text)})", None)
    assert isinstance(result, cv.celtypes.BoolType) and not result


def test_harness_refuses_to_parse_what_would_hang_the_api_server():
    with pytest.raises(cv.UnboundedQuantity):
        kubernetes_quantity("1e10000000")
    with pytest.raises(cv.UnboundedQuantity):
        kubernetes_quantity("1e2147483647")
    assert kubernetes_quantity("1e4294967297") == 10  # int32(4294967297) == 1, as in Go


@pytest.mark.parametrize(("rule", "expected"), [
    # The library's documented examples (k8s.io/apiserver/pkg/cel/library/quantity.go).
    ("quantity('200M').compareTo(quantity('0.2G'))", 0),
    ("quantity('50M').compareTo(quantity('50Mi'))", -1),
    ("quantity('50Mi').compareTo(quantity('50M'))", 1),
    ("quantity('150Mi').isGreaterThan(quantity('100Mi'))", True),
    ("quantity('50Mi').isGreaterThan(quantity('100Mi'))", False),
    ("quantity('50M').isLessThan(quantity('100M'))", True),
    ("quantity('100M').isLessThan(quantity('50M'))", False),
    ("isQuantity('1.3G') && isQuantity('1.3Gi') && isQuantity('10000k')", True),
    ("sign(quantity('-1m')) == -1 && sign(quantity('0')) == 0", True),
])
def test_harness_cel_quantity_library(rule, expected):
    assert cv.evaluate(rule, None) == expected


