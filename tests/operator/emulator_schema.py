"""The built-in schema of the kinds the operator writes, and quantities as a Go API server
stores them: what ``MetrolineEmulator`` (``emulator.py``) uses to answer as a real server does.

``BuiltinSchema`` reads kubernetes-validate's strict JSON schemas and normalises an object as
the server re-encodes it (``canonical_quantity`` for every ``Quantity``, Go's ``omitempty`` for
empty strings, lists and maps), collecting the paths of fields the schema does not declare in
structured-merge-diff's notation.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import kubernetes_validate.utils

# Quantities as apimachinery prints them (k8s.io/apimachinery/pkg/api/resource, quantity.go).

_QUANTITY = re.compile(
    r"^([+-]?)([0-9]*)(?:\.([0-9]*))?(?:([eE][+-]?[0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?)$"
)
_DECIMAL_SUFFIXES = {-9: "n", -6: "u", -3: "m", 0: "", 3: "k", 6: "M", 9: "G", 12: "T",
                     15: "P", 18: "E"}  # fmt: skip
_DECIMAL_POWERS = {suffix: power for power, suffix in _DECIMAL_SUFFIXES.items()}
_BINARY_SUFFIXES = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
_MAX_BINARY = 2**63 - 1
_MAX_EXPONENT = 1000
"""Larger exponents are left as written (their cost is what hangs a real server)."""


def canonical_quantity(value: str | int | float) -> str | int | float:
    """``value`` as the API server stores it: ParseQuantity then String. Values that do not
    parse (or carry an exponent beyond ``_MAX_EXPONENT``) come back unchanged.

    Parsing rounds away from zero to a multiple of 1n and caps binary-suffixed values at
    2^63-1; printing picks the largest suffix of the value's own kind (binary for ``Ki``...,
    exponent for ``e3``, decimal otherwise) that leaves an integer mantissa: ``0.5`` ->
    ``500m``, ``1024Mi`` -> ``1Gi``, ``1.5Gi`` -> ``1536Mi``, ``1e3`` -> ``1e3``; binary values
    below 1024 or with a fraction print as decimal (``0.5Ki`` -> ``512``)."""
    text = str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
    match = _QUANTITY.match(text) if isinstance(text, str) else None
    if match is None or not (match.group(2) or match.group(3)):
        return value
    sign, whole, fraction, exponent, suffix = match.groups()
    fraction = fraction or ""
    number = Fraction(int((whole or "0") + fraction), 10 ** len(fraction))
    if exponent is not None:
        power = int(exponent[1:])
        if abs(power) > _MAX_EXPONENT:
            return value
        kind, number = "exponent", number * Fraction(10) ** power
    elif suffix and suffix.endswith("i"):
        kind, number = "binary", number * 2 ** (10 * _BINARY_SUFFIXES.index(suffix))
    else:
        kind = "decimal"
        number *= Fraction(10) ** _DECIMAL_POWERS[suffix or ""]
    number = Fraction(math.ceil(number * 10**9), 10**9)  # magnitude: rounds away from zero
    if kind == "binary":
        number = min(number, Fraction(_MAX_BINARY))
        if number < 1024 or number.denominator != 1:
            kind = "decimal"
    if number == 0:
        return "0"
    minus = "-" if sign == "-" else ""
    if kind == "binary":
        mantissa, power = int(number), 0
        while mantissa % 1024 == 0:
            mantissa, power = mantissa // 1024, power + 1
        return f"{minus}{mantissa}{_BINARY_SUFFIXES[power]}"
    mantissa, power = int(number * 10**9), -9
    while mantissa % 10 == 0:
        mantissa, power = mantissa // 10, power + 1
    while power % 3:
        mantissa, power = mantissa * 10, power - 1
    if kind == "decimal" and power in _DECIMAL_SUFFIXES:
        return f"{minus}{mantissa}{_DECIMAL_SUFFIXES[power]}"
    return f"{minus}{mantissa}" + (f"e{power}" if power else "")


# The built-in schema of the kinds the operator writes.

QUANTITY_DEFINITION = "io.k8s.apimachinery.pkg.api.resource.Quantity"
SCHEMA_FILES = {
    ("apps/v1", "Deployment"): "deployment-apps-v1.json",
    ("v1", "Service"): "service-v1.json",
    ("v1", "Pod"): "pod-v1.json",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudget-policy-v1.json",
}


@dataclass
class Normalised:
    obj: Any
    undeclared: list[str] = field(default_factory=list)
    """Paths of fields the schema does not declare, in structured-merge-diff's notation."""


class BuiltinSchema:
    """The strict JSON schemas that kubernetes-validate ships (newest Kubernetes version)."""

    def __init__(self) -> None:
        version = kubernetes_validate.utils.latest_version()
        folder = importlib.resources.files("kubernetes_validate").joinpath(
            "kubernetes-json-schema", f"v{version}-local-strict")
        self.version = version
        self._folder = folder
        self.defs: dict[str, Any] = json.loads(
            folder.joinpath("_definitions.json").read_text())["$defs"]
        self._roots: dict[tuple[str, str], dict[str, Any]] = {}

    def knows(self, obj: Any) -> bool:
        return isinstance(obj, dict) and (obj.get("apiVersion"), obj.get("kind")) in SCHEMA_FILES

    def root(self, api_version: str, kind: str) -> dict[str, Any]:
        key = (api_version, kind)
        if key not in self._roots:
            self._roots[key] = json.loads(self._folder.joinpath(SCHEMA_FILES[key]).read_text())
        return self._roots[key]

    def normalise(self, obj: dict[str, Any]) -> Normalised:
        """``obj`` as the server would store it, and the fields its schema lacks."""
        result = Normalised(None)
        result.obj = self._walk(obj, self.root(obj["apiVersion"], obj["kind"]), "", result)
        return result

    def _resolve(self, node: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        name = None
        while "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            node = self.defs[name]
        return name, node

    def _walk(self, value: Any, node: dict[str, Any], path: str, result: Normalised) -> Any:
        name, node = self._resolve(node)
        if name == QUANTITY_DEFINITION:
            return canonical_quantity(value) if isinstance(value, str | int | float) else value
        if isinstance(value, dict):
            props, extra = node.get("properties"), node.get("additionalProperties")
            if props is None:
                if not isinstance(extra, dict):
                    return value
                return {k: self._walk(v, extra, f"{path}.{k}", result) for k, v in value.items()}
            required = set(node.get("required") or ())
            out = {}
            for key, item in value.items():
                if key not in props:
                    if extra is False:
                        result.undeclared.append(f"{path}.{key}")
                    out[key] = item
                    continue
                item = self._walk(item, props[key], f"{path}.{key}", result)
                if key in required or not self._omitted(item, props[key]):
                    out[key] = item
            return out
        if isinstance(value, list) and "items" in node:
            keys = node.get("x-kubernetes-list-map-keys")
            return [self._walk(item, node["items"], path + _element(item, index, keys), result)
                    for index, item in enumerate(value)]  # fmt: skip
        return value

    def _omitted(self, value: Any, node: dict[str, Any]) -> bool:
        """Go's ``omitempty``: an empty string, list or map is not encoded."""
        _, node = self._resolve(node)
        types = node.get("type") or ()
        if value == "":
            return "string" in types
        if value == [] or value == {}:
            return "array" in types or ("object" in types and "properties" not in node)
        return False


def _element(item: Any, index: int, keys: list[str] | None) -> str:
    """A list element in structured-merge-diff's path notation."""
    if keys and isinstance(item, dict) and all(key in item for key in keys):
        return "[" + ",".join(f"{key}={json.dumps(item[key])}" for key in keys) + "]"
    return f"[{index}]"


@functools.cache
def builtin_schema() -> BuiltinSchema:
    return BuiltinSchema()
