"""Validate custom resources against the committed CRD the way an API server would.

Steps, as in kube-apiserver (apiextensions-apiserver's customresource strategy): apply
structural defaults; check the OpenAPI schema (unknown fields are errors, as with kubectl's
default strict field validation); enforce ``x-kubernetes-list-type: map`` key uniqueness; then,
unless a schema error is of a kind that blocks CEL (wrong type, missing required field, enum,
maxLength, maxItems: ``hasBlockingErr`` in strategy.go; a pattern or a minimum does not block),
evaluate every CEL rule with cel-python. Rules see property names escaped as Kubernetes
escapes them (``ephemeral-storage`` is ``ephemeral__dash__storage``), and the Kubernetes
quantity library that cel-python lacks is implemented here: ``quantity()``, ``isQuantity()``,
``sign()``, ``compareTo``, ``isLessThan``, ``isGreaterThan``, after
k8s.io/apiserver/pkg/cel/library/quantity.go, with values as
k8s.io/apimachinery/pkg/api/resource.ParseQuantity computes them (its scanner, suffixes, the
exponent read as an int64 and truncated to int32, non-zero values rounded up to the nano,
binary-suffix values capped at 2^63-1). The real parser's cost grows with the exponent (it
computes 10^exponent); a rule that would hand it such a string fails the test
(``UnboundedQuantity``) instead of being evaluated.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml
from celpy import celtypes
from celpy.evaluation import CELEvalError

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "llmdeployments.yaml"

BLOCKING = frozenset({
    "type", "anyOf", "required", "enum", "maxLength", "maxItems", "maxProperties",
    "additionalProperties",
})
"""jsonschema keywords whose failures the API server treats as blocking CEL (type invalid,
required, not supported, too long, too many); an unknown field never gets that far (strict
field validation refuses the request while decoding)."""

UNBOUNDED_EXPONENT = 1000
"""A decimal exponent beyond which resource.ParseQuantity's cost becomes noticeable (it
rounds to the nano by multiplying by 10^(exponent+9)); 1e10000000 took the API server 30 s."""

CALLS: list[str] = []
"""Every string the rules handed to ``quantity()`` or ``isQuantity()``, in order."""


class UnboundedQuantity(AssertionError):
    """A CEL rule handed Kubernetes' quantity parser a string whose cost is unbounded."""


def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


def apply_defaults(schema: dict[str, Any], obj: Any) -> Any:
    """Fill ``default`` values into present objects, recursively (structural defaulting)."""
    if isinstance(obj, dict) and "properties" in schema:
        for key, sub in schema["properties"].items():
            if key not in obj and "default" in sub:
                obj[key] = copy.deepcopy(sub["default"])
            if key in obj:
                obj[key] = apply_defaults(sub, obj[key])
    elif isinstance(obj, list) and "items" in schema:
        return [apply_defaults(schema["items"], item) for item in obj]
    return obj


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-validations")}
    if "properties" in out:
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
        if not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if "items" in out:
        out["items"] = _strict(out["items"])
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(out["additionalProperties"])
    return out


def _walk(schema: dict[str, Any], obj: Any, path: str) -> Iterator[tuple[dict, Any, str]]:
    yield schema, obj, path
    if isinstance(obj, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in obj:
                yield from _walk(sub, obj[key], f"{path}.{key}")
        if isinstance(schema.get("additionalProperties"), dict):
            for key, value in obj.items():
                yield from _walk(schema["additionalProperties"], value, f"{path}[{key!r}]")
    elif isinstance(obj, list) and "items" in schema:
        for index, item in enumerate(obj):
            yield from _walk(schema["items"], item, f"{path}[{index}]")


def _list_map_errors(schema: dict[str, Any], obj: Any, path: str) -> list[str]:
    if schema.get("x-kubernetes-list-type") != "map" or not isinstance(obj, list):
        return []
    keys = schema["x-kubernetes-list-map-keys"]
    seen = [tuple(item.get(k) for k in keys) for item in obj]
    return [f"{path}: duplicate entries for key {k}" for k in set(seen) if seen.count(k) > 1]


# --- Kubernetes' CEL quantity library ---------------------------------------------------------

_DECIMAL_SI = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15,
               "E": 18}
_BINARY_SI = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_DIGITS = "0123456789"
_MAX_ALLOWED = Fraction(2**63 - 1)


def _scan(text: str) -> tuple[bool, str, str, str]:
    """parseQuantityString: (positive, numerator, denominator, suffix); ValueError for
    ErrFormatWrong."""
    positive, pos, end = True, 0, len(text)
    if text[0] in "+-":
        positive, pos = text[0] == "+", 1
    while pos < end and text[pos] == "0":  # leading zeros
        pos += 1
    if pos >= end:
        return positive, "0", "", ""
    start = pos
    while pos < end and text[pos] in _DIGITS:
        pos += 1
    num = text[start:pos] or "0"
    denom = ""
    if pos < end and text[pos] == ".":
        pos += 1
        start = pos
        while pos < end and text[pos] in _DIGITS:
            pos += 1
        denom = text[start:pos]
    suffix_start = pos
    while pos < end and text[pos] in "eEinumkKMGTP":
        pos += 1
    if pos < end and text[pos] in "+-":
        pos += 1
    while pos < end and text[pos] in _DIGITS:
        pos += 1
    if pos < end:
        raise ValueError(f"quantities must match the regular expression ({text!r})")
    return positive, num, denom, text[suffix_start:]


def _int64(text: str) -> int:
    """strconv.ParseInt(text, 10, 64)."""
    body = text[1:] if text[:1] in "+-" else text
    if not body or any(ch not in _DIGITS for ch in body):
        raise ValueError(f"invalid exponent {text!r}")
    value = int(text)
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"exponent {text!r} out of range")
    return value


def kubernetes_quantity(text: str) -> Fraction:
    """resource.ParseQuantity(text)'s value; ValueError where it returns an error."""
    if not text:
        raise ValueError("empty quantity")
    positive, num, denom, suffix = _scan(text)
    if suffix in _DECIMAL_SI:
        base, exponent, binary = 10, _DECIMAL_SI[suffix], False
    elif suffix in _BINARY_SI:
        base, exponent, binary = 2, _BINARY_SI[suffix], True
    elif len(suffix) > 1 and suffix[0] in "eE":
        parsed = _int64(suffix[1:])
        base, exponent, binary = 10, (parsed + 2**31) % 2**32 - 2**31, False  # int32(parsed)
    else:
        raise ValueError(f"unable to parse quantity's suffix ({text!r})")
    if abs(exponent) > UNBOUNDED_EXPONENT:
        raise UnboundedQuantity(
            f"quantity({text!r}): the API server would compute 10^{exponent} to read it"
        )
    value = Fraction(f"{num}.{denom or '0'}") * Fraction(base) ** exponent
    if value:
        value = Fraction(math.ceil(value * 10**9), 10**9)  # inf.RoundUp to the nano
    if binary:
        value = min(value, _MAX_ALLOWED)
    return value if positive else -value


class KubeQuantity:
    """A CEL value of Kubernetes' Quantity type."""

    def __init__(self, value: Fraction) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"KubeQuantity({self.value})"


def _parse_for_cel(text: Any) -> Fraction:
    if not isinstance(text, str):
        raise TypeError(f"no such overload: quantity({type(text).__name__})")
    CALLS.append(str(text))
    return kubernetes_quantity(str(text))


def _quantity(text: Any) -> Any:
    try:
        return KubeQuantity(_parse_for_cel(text))
    except UnboundedQuantity as error:
        _UNBOUNDED.append(str(error))
        return CELEvalError(str(error), UnboundedQuantity, ())
    except (TypeError, ValueError) as error:
        return CELEvalError(str(error), type(error), ())


def _is_quantity(text: Any) -> Any:
    try:
        _parse_for_cel(text)
    except UnboundedQuantity as error:
        _UNBOUNDED.append(str(error))
        return CELEvalError(str(error), UnboundedQuantity, ())
    except (TypeError, ValueError):
        return celtypes.BoolType(False)
    return celtypes.BoolType(True)


def _two(a: Any, b: Any) -> tuple[Fraction, Fraction]:
    if not isinstance(a, KubeQuantity) or not isinstance(b, KubeQuantity):
        raise TypeError("no such overload: these functions take two quantities")
    return a.value, b.value


def _compare_to(a: Any, b: Any) -> Any:
    x, y = _two(a, b)
    return celtypes.IntType((x > y) - (x < y))


def _is_less_than(a: Any, b: Any) -> Any:
    x, y = _two(a, b)
    return celtypes.BoolType(x < y)


def _is_greater_than(a: Any, b: Any) -> Any:
    x, y = _two(a, b)
    return celtypes.BoolType(x > y)


def _sign(a: Any) -> Any:
    if not isinstance(a, KubeQuantity):
        raise TypeError("no such overload: sign")
    return celtypes.IntType((a.value > 0) - (a.value < 0))


QUANTITY_FUNCTIONS = {
    "quantity": _quantity, "isQuantity": _is_quantity, "compareTo": _compare_to,
    "isLessThan": _is_less_than, "isGreaterThan": _is_greater_than, "sign": _sign,
}
_UNBOUNDED: list[str] = []


def evaluate(rule: str, value: Any) -> Any:
    """A CEL expression's result for ``self`` = ``value`` (a CEL value), with the library."""
    return _program(rule).evaluate({"self": value})


# --- CEL over the object ----------------------------------------------------------------------

_CEL_KEYWORDS = frozenset({
    "true", "false", "null", "in", "as", "break", "const", "continue", "else", "for",
    "function", "if", "import", "let", "loop", "package", "namespace", "return",
})


def escape(name: str) -> str:
    """A property name as Kubernetes CEL exposes it (k8s.io/apiserver/pkg/cel escaping)."""
    if name in _CEL_KEYWORDS:
        return f"__{name}__"
    return (name.replace("__", "__underscores__").replace(".", "__dot__")
            .replace("-", "__dash__").replace("/", "__slash__"))


def to_cel(schema: dict[str, Any], value: Any) -> Any:
    """``value`` as CEL sees it: object properties escaped, map keys (additionalProperties)
    and everything else as they are."""
    if isinstance(value, dict):
        if "properties" in schema:
            props = schema["properties"]
            return celtypes.MapType({
                celtypes.StringType(escape(k)): to_cel(props.get(k, {}), v)
                for k, v in value.items()
            })
        values = schema.get("additionalProperties")
        values = values if isinstance(values, dict) else {}
        return celtypes.MapType({
            celtypes.StringType(k): to_cel(values, v) for k, v in value.items()
        })
    if isinstance(value, list):
        return celtypes.ListType([to_cel(schema.get("items", {}), v) for v in value])
    return celpy.json_to_cel(value)


@functools.cache
def _program(rule: str) -> Any:
    environment = celpy.Environment()
    return environment.program(environment.compile(rule), functions=QUANTITY_FUNCTIONS)


@functools.cache
def openapi_schema() -> dict[str, Any]:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@functools.cache
def _validator() -> jsonschema.Draft4Validator:
    return jsonschema.Draft4Validator(_strict(openapi_schema()))


@functools.cache
def _validator_of(schema_text: str) -> jsonschema.Draft4Validator:
    return jsonschema.Draft4Validator(_strict(json.loads(schema_text)))


def _cel_errors(schema: dict[str, Any], obj: Any, path: str) -> list[str]:
    errors = []
    for rule in schema.get("x-kubernetes-validations") or []:
        del _UNBOUNDED[:]
        try:
            result = evaluate(rule["rule"], to_cel(schema, obj))
        except CELEvalError as error:
            result = error
        if _UNBOUNDED:
            raise UnboundedQuantity(f"{path}: rule {rule['rule']!r}: {_UNBOUNDED[0]}")
        if isinstance(result, CELEvalError):
            errors.append(f"{path}: {rule['message']} (rule evaluation error: {result.args[0]})")
        elif not (isinstance(result, celtypes.BoolType) and bool(result)):
            errors.append(f"{path}: {rule['message']}")
    return errors


def _decoded(value: Any) -> Any:
    """``value`` as the API server's JSON decoder hands it on: a number that does not fit an
    int64 becomes a float64 (sigs.k8s.io/json)."""
    if isinstance(value, dict):
        return {k: _decoded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decoded(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        return float(value)
    return value


def validate_cr(obj: dict[str, Any]) -> list[str]:
    """Every reason the API server would refuse ``obj``; empty when it would accept it."""
    return validate_against(openapi_schema(), obj, _validator())


def validate_against(
    schema: dict[str, Any], obj: dict[str, Any],
    validator: jsonschema.Draft4Validator | None = None,
) -> list[str]:
    """Every reason an API server with a CRD of ``openAPIV3Schema`` ``schema`` would refuse
    ``obj`` (``validate_cr`` for another CRD, e.g. the Gateway API Inference Extension's)."""
    if validator is None:
        validator = _validator_of(json.dumps(schema, sort_keys=True))
    obj = apply_defaults(schema, _decoded(obj))
    schema_errors = list(validator.iter_errors(obj))
    errors = [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in schema_errors]
    blocked = any(e.validator in BLOCKING for e in schema_errors)
    for sub, value, path in _walk(schema, obj, ""):
        errors += _list_map_errors(sub, value, path)
        if not blocked:
            errors += _cel_errors(sub, value, path)
    return errors


def defaulted(obj: dict[str, Any]) -> dict[str, Any]:
    return apply_defaults(openapi_schema(), copy.deepcopy(obj))
