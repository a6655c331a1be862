"""Bounded JSON schemas for the structured-output tests (engine and server) and benchmark.

Every schema bounds its instances: strings have ``maxLength``, arrays ``maxItems``, integers
``minimum`` and ``maximum``, objects list their properties with ``additionalProperties:
false``; numbers with fractions are left out (their digits are unbounded). So an output
that follows the grammar ends within a known number of tokens.
"""

from __future__ import annotations

from typing import Any


def _obj(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


_NAME = {"type": "string", "maxLength": 8}
_AGE = {"type": "integer", "minimum": 0, "maximum": 120}

SCHEMAS: list[dict[str, Any]] = [
    _obj({"name": _NAME}),
    _obj({"age": _AGE}),
    _obj({"ok": {"type": "boolean"}}),
    _obj({"color": {"enum": ["red", "green", "blue"]}}),
    _obj({"name": _NAME, "age": _AGE, "ok": {"type": "boolean"}}),
    _obj({"tags": {"type": "array", "items": _NAME, "maxItems": 3}}),
    _obj({"scores": {"type": "array", "items": _AGE, "minItems": 1, "maxItems": 4}}),
    _obj({"user": _obj({"name": _NAME, "age": _AGE})}),
    _obj({"a": _obj({"b": _obj({"c": {"type": "boolean"}})})}),
    _obj({"level": {"type": "integer", "minimum": -5, "maximum": 5}}),
    _obj({"code": {"type": "string", "minLength": 2, "maxLength": 4}}),
    _obj({"flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 5}}),
    _obj({"name": _NAME, "nick": _NAME}, required=["name"]),
    _obj({"kind": {"const": "point"}, "x": _AGE, "y": _AGE}),
    _obj({"items": {"type": "array", "items": _obj({"id": _AGE}), "maxItems": 2}}),
    _obj({"status": {"enum": ["on", "off", 1, 2, True, None]}}),
    _obj({"maybe": {"anyOf": [{"type": "null"}, _AGE]}}),
    _obj({"pair": {"type": "array", "prefixItems": [_NAME, _AGE], "items": False}}),
    _obj({"empty": _obj({})}),
    _obj(
        {
            "id": {"type": "integer", "minimum": 1, "maximum": 999},
            "owner": _obj({"name": _NAME, "admin": {"type": "boolean"}}),
            "labels": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2},
        }
    ),
]

#: Schemas whose instances run long (many items, long strings): decode-heavy outputs, where
#: the grammar works on every token of a long answer.
LONG_SCHEMAS: list[dict[str, Any]] = [
    _obj(
        {
            "items": {
                "type": "array",
                "items": {"type": "string", "maxLength": 16},
                "minItems": 20,
                "maxItems": 40,
            }
        }
    ),
    _obj(
        {
            "rows": {
                "type": "array",
                "items": _obj(
                    {
                        "id": {"type": "integer", "minimum": 0, "maximum": 9999},
                        "name": {"type": "string", "maxLength": 12},
                        "ok": {"type": "boolean"},
                    }
                ),
                "minItems": 10,
                "maxItems": 20,
            }
        }
    ),
    _obj({"text": {"type": "string", "minLength": 200, "maxLength": 400}}),
    _obj(
        {
            "numbers": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 1000000},
                "minItems": 30,
                "maxItems": 60,
            }
        }
    ),
]
