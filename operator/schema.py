"""Turn a pydantic JSON Schema into a structural OpenAPI v3 schema for a CRD.

Kubernetes accepts only *structural* schemas: every node has a type, no ``$ref``, ``anyOf`` only
as a refinement, ``nullable`` instead of ``null`` types. The conversion is total over what
``spec.py`` uses and raises on anything else, so a new pydantic feature cannot silently produce
a schema that the API server would reject or read differently.

A field marked ``x-metroline-k8s-schema: "<definition>/<property>"`` (e.g.
``io.k8s.api.core.v1.PodSpec/affinity``) takes its schema from the Kubernetes OpenAPI
definitions passed as ``kubernetes`` (kubernetes-validate's ``_definitions.json``): ``$ref``s
inlined, ``null`` types and descriptions dropped, unknown keywords refused. The pydantic
model's own constraints (enums, lengths, item counts) are laid over it; where the model declares
properties, they must be exactly the Kubernetes type's, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

JsonSchema = dict[str, Any]

K8S_SCHEMA = "x-metroline-k8s-schema"
"""Marker of a field whose schema is a Kubernetes type's (see the module docstring)."""

_KEPT = frozenset({
    "type", "description", "default", "enum", "format", "pattern",
    "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems",
    "x-kubernetes-validations", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
    "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-map-type",
})
_DROPPED = frozenset({"title", "additionalProperties", "x-metroline-opaque", "$defs"})
_HANDLED = frozenset({
    "$ref", "anyOf", "properties", "required", "items", "exclusiveMinimum", "exclusiveMaximum",
    "const", K8S_SCHEMA,
})
_REFINEMENTS = frozenset({
    "enum", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "minLength", "maxLength", "minItems", "maxItems", "x-kubernetes-validations", "default",
})
"""What a pydantic model may add to a Kubernetes type's schema."""

_K8S_KEPT = frozenset({
    "format", "required", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
})
_K8S_HANDLED = frozenset({"$ref", "type", "properties", "items", "additionalProperties"})
_K8S_DROPPED = frozenset({"description"})
"""The Kubernetes types' descriptions would make up four fifths of the CRD; ``kubectl explain
pod.spec.affinity`` shows them."""


class SchemaConversionError(ValueError):
    """The pydantic schema uses a construct with no structural equivalent here."""


def to_structural(
    schema: JsonSchema,
    defs: dict[str, JsonSchema] | None = None,
    *,
    kubernetes: Mapping[str, JsonSchema] | None = None,
) -> JsonSchema:
    """Convert ``schema`` (with its ``$defs``) into a self-contained structural schema;
    ``kubernetes`` holds the Kubernetes OpenAPI definitions that marked fields use."""
    defs = schema.get("$defs", {}) if defs is None else defs
    return _Converter(defs, kubernetes).convert(schema)


def _resolve(node: JsonSchema, defs: Mapping[str, JsonSchema], prefix: str) -> JsonSchema:
    """Inline ``$ref``; keys beside the reference (description, default) win over the target."""
    if "$ref" not in node:
        return node
    name = node["$ref"].removeprefix(prefix)
    target = _resolve(defs[name], defs, prefix)
    return {**target, **{k: v for k, v in node.items() if k != "$ref"}}


class _Converter:
    def __init__(
        self, defs: dict[str, JsonSchema], kubernetes: Mapping[str, JsonSchema] | None
    ) -> None:
        self.defs, self.kubernetes = defs, kubernetes

    def _collapse_any_of(self, node: JsonSchema) -> JsonSchema:
        """Optional[X] becomes X; int | str becomes int-or-string; anything else is refused."""
        members = [_resolve(m, self.defs, "#/$defs/") for m in node["anyOf"]]
        outer = {k: v for k, v in node.items() if k != "anyOf"}
        non_null = [m for m in members if m.get("type") != "null"]
        if len(non_null) == 1:
            inner = non_null[0]
            if "anyOf" in inner:
                inner = self._collapse_any_of(inner)
            merged = {**inner, **outer}
            if merged.get("default", 0) is None:
                del merged["default"]
            return merged
        types = sorted(m.get("type") for m in non_null)
        if types == ["integer", "string"]:
            return self._int_or_string(non_null, outer)
        raise SchemaConversionError(f"anyOf of {types} has no structural form")

    @staticmethod
    def _int_or_string(members: list[JsonSchema], outer: JsonSchema) -> JsonSchema:
        """The value validations of both members move to the node: OpenAPI applies ``pattern``
        and lengths to strings only and ``minimum``/``maximum`` to numbers only."""
        integer = next(m for m in members if m["type"] == "integer")
        string = next(m for m in members if m["type"] == "string")
        result: JsonSchema = {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-int-or-string": True,
        }
        for member, keys in ((integer, ("minimum", "maximum")),
                             (string, ("pattern", "minLength", "maxLength"))):
            unknown = set(member) - set(keys) - {"type"}
            if unknown:
                raise SchemaConversionError(f"int-or-string member keys {sorted(unknown)}")
            result.update({k: member[k] for k in keys if k in member})
        for key in ("description", "default", "x-kubernetes-validations"):
            if outer.get(key) is not None:
                result[key] = outer[key]
        return result

    def convert(self, node: JsonSchema) -> JsonSchema:
        node = _resolve(node, self.defs, "#/$defs/")
        if "anyOf" in node:
            collapsed = self._collapse_any_of(node)
            if "x-kubernetes-int-or-string" in collapsed:
                return {k: v for k, v in collapsed.items() if k not in _DROPPED}
            return self.convert(collapsed)
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
            out["properties"] = {k: self.convert(v) for k, v in node["properties"].items()}
            if node.get("required"):
                out["required"] = list(node["required"])
        elif node.get("type") == "object" and isinstance(node.get("additionalProperties"), dict):
            out["additionalProperties"] = self.convert(node["additionalProperties"])
        if "items" in node:
            out["items"] = self.convert(node["items"])
        if "type" not in out:
            raise SchemaConversionError(f"schema node without a type: {node}")
        if K8S_SCHEMA in node:
            return self._kubernetes_field(node[K8S_SCHEMA], out)
        return out

    def _kubernetes_field(self, where: str, ours: JsonSchema) -> JsonSchema:
        if self.kubernetes is None:
            raise SchemaConversionError(f"{where}: no Kubernetes definitions were given")
        definition, _, field = where.rpartition("/")
        try:
            node = self.kubernetes[definition]["properties"][field]
        except KeyError:
            raise SchemaConversionError(f"{where}: not in the Kubernetes definitions") from None
        theirs = self._k8s(node, ())
        merged = _overlay(theirs, ours, where)
        if "description" in ours:
            merged["description"] = ours["description"]
        return merged

    def _k8s(self, node: JsonSchema, stack: tuple[str, ...]) -> JsonSchema:
        """A Kubernetes OpenAPI node as a self-contained structural schema."""
        if "$ref" in node:
            name = node["$ref"].removeprefix("#/$defs/")
            if name in stack:
                raise SchemaConversionError(f"recursive Kubernetes type {name}")
            assert self.kubernetes is not None
            target = {**self.kubernetes[name], **{k: v for k, v in node.items() if k != "$ref"}}
            return self._k8s(target, (*stack, name))
        unknown = set(node) - _K8S_KEPT - _K8S_HANDLED - _K8S_DROPPED
        if unknown:
            raise SchemaConversionError(f"unsupported Kubernetes schema keys {sorted(unknown)}")
        types = node.get("type")
        types = [types] if isinstance(types, str) else [t for t in types or () if t != "null"]
        if len(types) != 1:
            raise SchemaConversionError(f"Kubernetes schema node of types {types}")
        out: JsonSchema = {"type": types[0], **{k: v for k, v in node.items() if k in _K8S_KEPT}}
        if "properties" in node:
            out["properties"] = {k: self._k8s(v, stack) for k, v in node["properties"].items()}
        if isinstance(node.get("additionalProperties"), dict):
            out["additionalProperties"] = self._k8s(node["additionalProperties"], stack)
        if "items" in node:
            out["items"] = self._k8s(node["items"], stack)
        return out


def _overlay(theirs: JsonSchema, ours: JsonSchema, where: str) -> JsonSchema:
    """The Kubernetes schema ``theirs`` with the model's constraints from ``ours``."""
    if theirs["type"] != ours["type"]:
        raise SchemaConversionError(f"{where}: {ours['type']} in the model, "
                                    f"{theirs['type']} in Kubernetes")
    out = {**theirs, **{k: v for k, v in ours.items() if k in _REFINEMENTS}}
    if "properties" in ours:
        if set(ours["properties"]) != set(theirs.get("properties", {})):
            raise SchemaConversionError(
                f"{where}: the model has fields {sorted(ours['properties'])}, Kubernetes "
                f"{sorted(theirs.get('properties', {}))}"
            )
        out["properties"] = {
            k: _overlay(theirs["properties"][k], v, f"{where}.{k}")
            for k, v in ours["properties"].items()
        }
    if "items" in ours:
        out["items"] = _overlay(theirs["items"], ours["items"], f"{where}[]")
    if "additionalProperties" in ours and "additionalProperties" in theirs:
        out["additionalProperties"] = _overlay(
            theirs["additionalProperties"], ours["additionalProperties"], f"{where}{{}}"
        )
    return out
