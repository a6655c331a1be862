"""Turn a pydantic JSON Schema into a structural OpenAPI v3 schema for a CRD.

Kubernetes accepts only *structural* schemas: every node has a type, no ``$ref``, ``anyOf`` only
as a refinement, ``nullable`` instead of ``null`` types. The conversion is total over what
``spec.py`` uses and raises on anything else, so a new pydantic feature cannot silently produce
a schema that the API server would reject or read differently.
"""

from __future__ import annotations

from typing import Any

JsonSchema = dict[str, Any]

_KEPT = frozenset({
    "type", "description", "default", "enum", "format", "pattern",
    "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems",
    "x-kubernetes-validations", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
    "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields",
})
_DROPPED = frozenset({"title", "additionalProperties", "x-metroline-opaque", "$defs"})
_HANDLED = frozenset({
    "$ref", "anyOf", "properties", "required", "items", "exclusiveMinimum", "exclusiveMaximum",
    "const",
})


class SchemaConversionError(ValueError):
    """The pydantic schema uses a construct with no structural equivalent here."""


def to_structural(schema: JsonSchema, defs: dict[str, JsonSchema] | None = None) -> JsonSchema:
    """Convert ``schema`` (with its ``$defs``) into a self-contained structural schema."""
    defs = schema.get("$defs", {}) if defs is None else defs
    return _convert(schema, defs)


def _resolve(node: JsonSchema, defs: dict[str, JsonSchema]) -> JsonSchema:
    """Inline ``$ref``; keys beside the reference (description, default) win over the target."""
    if "$ref" not in node:
        return node
    name = node["$ref"].removeprefix("#/$defs/")
    target = _resolve(defs[name], defs)
    return {**target, **{k: v for k, v in node.items() if k != "$ref"}}


def _collapse_any_of(node: JsonSchema, defs: dict[str, JsonSchema]) -> JsonSchema:
    """Optional[X] becomes X; int | str becomes int-or-string; anything else is refused."""
    members = [_resolve(m, defs) for m in node["anyOf"]]
    outer = {k: v for k, v in node.items() if k != "anyOf"}
    non_null = [m for m in members if m.get("type") != "null"]
    if len(non_null) == 1:
        inner = non_null[0]
        if "anyOf" in inner:
            inner = _collapse_any_of(inner, defs)
        merged = {**inner, **outer}
        if merged.get("default", 0) is None:
            del merged["default"]
        return merged
    types = sorted(m.get("type") for m in non_null)
    if types == ["integer", "string"]:
        string = next(m for m in non_null if m["type"] == "string")
        result: JsonSchema = {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-int-or-string": True,
        }
        if "pattern" in string:
            result["pattern"] = string["pattern"]
        for key in ("description", "default"):
            if outer.get(key) is not None:
                result[key] = outer[key]
        return result
    raise SchemaConversionError(f"anyOf of {types} has no structural form")


def _convert(node: JsonSchema, defs: dict[str, JsonSchema]) -> JsonSchema:
    node = _resolve(node, defs)
    if "anyOf" in node:
        collapsed = _collapse_any_of(node, defs)
        if "x-kubernetes-int-or-string" in collapsed:
            return {k: v for k, v in collapsed.items() if k not in _DROPPED}
        return _convert(collapsed, defs)
    unknown = set(node) - _KEPT - _DROPPED - _HANDLED
    if unknown:
        raise SchemaConversionError(f"unsupported schema keys {sorted(unknown)}")
    out: JsonSchema = {k: v for k, v in node.items() if k in _KEPT}
    if "const" in node:
        out["enum"] = [node["const"]]
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if bound in node:
            out[limit] = node[bound]
            out[bound] = True
    if node.get("x-metroline-opaque"):
        out["x-kubernetes-preserve-unknown-fields"] = True
    if "properties" in node:
        out["properties"] = {k: _convert(v, defs) for k, v in node["properties"].items()}
        if node.get("required"):
            out["required"] = list(node["required"])
    elif node.get("type") == "object" and isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _convert(node["additionalProperties"], defs)
    if "items" in node:
        out["items"] = _convert(node["items"], defs)
    if "type" not in out:
        raise SchemaConversionError(f"schema node without a type: {node}")
    return out
