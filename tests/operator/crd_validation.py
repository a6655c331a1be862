"""Validate custom resources against the committed CRD the way an API server would.

Steps, as in kube-apiserver: apply structural defaults, check the OpenAPI schema (unknown
fields are errors, as with kubectl's default strict field validation), enforce
``x-kubernetes-list-type: map`` key uniqueness, then evaluate every CEL rule with cel-python.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "llmdeployments.yaml"


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
    elif isinstance(obj, list) and "items" in schema:
        for index, item in enumerate(obj):
            yield from _walk(schema["items"], item, f"{path}[{index}]")


def _list_map_errors(schema: dict[str, Any], obj: Any, path: str) -> list[str]:
    if schema.get("x-kubernetes-list-type") != "map" or not isinstance(obj, list):
        return []
    keys = schema["x-kubernetes-list-map-keys"]
    seen = [tuple(item.get(k) for k in keys) for item in obj]
    return [f"{path}: duplicate entries for key {k}" for k in set(seen) if seen.count(k) > 1]


@functools.cache
def _program(rule: str) -> Any:
    environment = celpy.Environment()
    return environment.program(environment.compile(rule))


@functools.cache
def openapi_schema() -> dict[str, Any]:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@functools.cache
def _validator() -> jsonschema.Draft4Validator:
    return jsonschema.Draft4Validator(_strict(openapi_schema()))


def _cel_errors(schema: dict[str, Any], obj: Any, path: str) -> list[str]:
    errors = []
    for rule in schema.get("x-kubernetes-validations") or []:
        if not _program(rule["rule"]).evaluate({"self": celpy.json_to_cel(obj)}):
            errors.append(f"{path}: {rule['message']}")
    return errors


def validate_cr(obj: dict[str, Any]) -> list[str]:
    """Every reason the API server would refuse ``obj``; empty when it would accept it."""
    schema = openapi_schema()
    obj = apply_defaults(schema, copy.deepcopy(obj))
    errors = [
        f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in _validator().iter_errors(obj)
    ]
    if errors:
        return errors
    for sub, value, path in _walk(schema, obj, ""):
        errors += _list_map_errors(sub, value, path) + _cel_errors(sub, value, path)
    return errors


def defaulted(obj: dict[str, Any]) -> dict[str, Any]:
    return apply_defaults(openapi_schema(), copy.deepcopy(obj))
