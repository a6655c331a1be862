"""Command-line flags generated from a dataclass's fields: one home for each knob's default,
type and help.

A field's ``metadata`` may hold ``help``, ``flag`` (the flag's name; default ``--field-name``),
``aliases`` and ``choices`` (the values a string flag takes; argparse exits 2 listing them).
The type comes from the annotation: ``bool`` fields become ``--x/--no-x``, ``int`` fields
take human-readable integers as vLLM's do (:func:`human_readable_int`), ``float`` fields
parse as such (``X | None`` as X), ``tuple[str, ...]`` fields take one or more values (or
one JSON list, vLLM's form), anything else takes a string. Every flag's help ends with its
default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any


def knob(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    aliases: tuple[str, ...] = (),
    choices: tuple[str, ...] = (),
) -> Any:
    """A dataclass field with its default, its help and optionally its flag's name,
    aliases and the values it may take: what :func:`add_flags` reads."""
    return dataclasses.field(
        default=default,
        metadata={"help": help, "flag": flag, "aliases": aliases, "choices": choices},
    )


#: Suffixes of human-readable integers: lower case decimal, upper case binary (as vLLM's).
_DECIMAL_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY_SUFFIXES = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_HUMAN_INT = re.compile(r"(\d+(?:\.\d+)?)([kmgtKMGT])")


def human_readable_int(text: str) -> int:
    """``"32k"`` -> 32000, ``"32K"`` -> 32768, ``"1.5k"`` -> 1500, ``"7"`` -> 7: vLLM's
    integers (decimals only with a decimal suffix). Raises ``ValueError``."""
    text = text.strip()
    match = _HUMAN_INT.fullmatch(text)
    if match is None:
        return int(text)
    number, suffix = match.groups()
    if suffix in _DECIMAL_SUFFIXES:
        return int(float(number) * _DECIMAL_SUFFIXES[suffix])
    if "." in number:
        raise argparse.ArgumentTypeError(
            f"{text!r}: no decimals with the binary suffix {suffix} (use {suffix.lower()})"
        )
    return int(number) * _BINARY_SUFFIXES[suffix]


human_readable_int.__name__ = "int"  # argparse says "invalid int value: 'x'"


def flag_name(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _parse_type(annotation: str) -> type | None:
    kinds = {part.strip() for part in annotation.split("|")} - {"None"}
    for kind in (bool, int, float, tuple):
        if kinds == {kind.__name__} or (kind is tuple and kinds == {"tuple[str, ...]"}):
            return kind
    return None


def _shown(default: Any) -> str:
    return " ".join(default) if isinstance(default, tuple) else str(default)


def add_flags(
    group: argparse._ActionsContainer,
    cls: type,
    *,
    skip: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """One flag per field of ``cls`` except ``skip``; ``defaults`` replaces some fields'
    defaults (a benchmark's workload may fix them)."""
    defaults = defaults or {}
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        if field.default is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{field.name} has no default: give it as an argument")
        default = defaults.get(field.name, field.default)
        kind = _parse_type(str(field.type))
        names = [flag_name(field), *field.metadata.get("aliases", ())]
        help_text = field.metadata.get("help", "")
        if default is not None and default != ():
            shown = _shown(default)
            help_text += f" (default: {shown})" if help_text else f"default: {shown}"
        options: dict[str, Any] = {"dest": field.name, "default": default, "help": help_text}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif kind is tuple:
            options["nargs"] = "+"
        elif kind is int:
            options["type"] = human_readable_int
        elif kind is not None:
            options["type"] = kind
        if field.metadata.get("choices"):
            options["choices"] = field.metadata["choices"]
        group.add_argument(*names, **options)


def flag_values(namespace: argparse.Namespace, cls: type, skip: Iterable[str] = ()) -> dict:
    """The parsed values of the flags :func:`add_flags` made for ``cls``; raises
    ``ValueError`` naming the flag for a malformed JSON list."""
    values = {}
    for field in dataclasses.fields(cls):
        if field.name in skip or not hasattr(namespace, field.name):
            continue
        value = getattr(namespace, field.name)
        if _parse_type(str(field.type)) is tuple and isinstance(value, list):
            value = _string_list(value, flag_name(field))
        values[field.name] = value
    return values


def _string_list(values: list[str], flag: str) -> tuple[str, ...]:
    """A list flag's values; one that is a JSON list (``'["a", "b"]'``) stands for its
    items."""
    items: list[str] = []
    for value in values:
        if not value.lstrip().startswith("["):
            items.append(value)
            continue
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"{flag}: {value!r} is not a JSON list ({error.msg})") from None
        if not isinstance(parsed, list) or not all(isinstance(item, str) for item in parsed):
            raise ValueError(f"{flag}: {value!r} must be a JSON list of strings")
        items.extend(parsed)
    return tuple(items)
