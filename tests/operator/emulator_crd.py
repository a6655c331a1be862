"""Custom resources of other projects' CRDs, admitted by ``MetrolineEmulator`` as a real API
server with those CRDs installed admits them (``emulator.py``).

A CRD counts as installed when the test declares its resource in the emulator's discovery
(``emulator.resources[...] = ResourceInfo(...)``); a write to an undeclared resource is a 404
``NotFound`` "the server could not find the requested resource", as on a cluster without the
CRD. For an installed one, ``admit`` does what kube-apiserver's customresource strategy does:
structural defaults applied (and stored), then the OpenAPI schema and the CEL rules checked with
the machinery of ``crd_validation.py``; a failure is a 422 ``Invalid``. ``undeclared`` lists the
fields that a server-side apply's typed conversion refuses ("field not declared in schema").

Known CRDs: the Gateway API Inference Extension's ``InferencePool``
(``data/gateway-api-inference-extension/``, see its README).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import yaml

from .crd_validation import apply_defaults, validate_against

DATA = Path(__file__).resolve().parent / "data"
CRD_FILES = (DATA / "gateway-api-inference-extension"
             / "inference.networking.k8s.io_inferencepools.yaml",)  # fmt: skip


@functools.cache
def schemas() -> dict[tuple[str, str], tuple[str, dict[str, Any]]]:
    """(apiVersion, kind) -> (the resource as ``plural.group``, its openAPIV3Schema)."""
    found = {}
    for path in CRD_FILES:
        crd = yaml.safe_load(path.read_text())
        spec = crd["spec"]
        for version in spec["versions"]:
            key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
            found[key] = (f"{spec['names']['plural']}.{spec['group']}",
                          version["schema"]["openAPIV3Schema"])  # fmt: skip
    return found


def knows(obj: Any) -> bool:
    return isinstance(obj, dict) and (obj.get("apiVersion"), obj.get("kind")) in schemas()


def undeclared(obj: dict[str, Any]) -> list[str]:
    """Paths (structured-merge-diff's notation) of fields ``obj``'s schema does not declare."""
    _, schema = schemas()[obj["apiVersion"], obj["kind"]]
    found: list[str] = []
    _walk(schema, obj, "", found)
    return found


def _walk(schema: dict[str, Any], value: Any, path: str, found: list[str]) -> None:
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        if props is None:
            if isinstance(extra, dict):
                for key, item in value.items():
                    _walk(extra, item, f"{path}.{key}", found)
            return
        for key, item in value.items():
            if key in props:
                _walk(props[key], item, f"{path}.{key}", found)
            elif not schema.get("x-kubernetes-preserve-unknown-fields"):
                found.append(f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            _walk(schema["items"], item, f"{path}[{index}]", found)


def admit(obj: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """``obj`` defaulted as the server stores it, and the 422 message if it is invalid."""
    resource, schema = schemas()[obj["apiVersion"], obj["kind"]]
    errors = validate_against(schema, obj)
    stored = apply_defaults(schema, copy.deepcopy(obj))
    if not errors:
        return stored, None
    name = (obj.get("metadata") or {}).get("name", "")
    what = f'{obj["kind"]}.{resource.split(".", 1)[1]} "{name}" is invalid: '
    errors = [error.lstrip(".") for error in errors]
    return stored, what + (errors[0] if len(errors) == 1 else f"[{', '.join(errors)}]")
