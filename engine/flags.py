"""Command-line flags generated from a dataclass's fields: one home for each knob's default,
type and help.

A field's ``metadata`` may hold ``help``, ``flag`` (the flag's name; default ``--field-name``)
and ``aliases``. The type comes from the annotation: ``bool`` fields become ``--x/--no-x``,
``int`` and ``float`` fields parse as such (``X | None`` as X), anything else as a string.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any


def knob(default: Any, help: str, *, flag: str | None = None, aliases: tuple[str, ...] = ()) -> Any:
    """A dataclass field with its default, its help and optionally its flag's name and
    aliases: what :func:`add_flags` reads."""
    return dataclasses.field(
        default=default, metadata={"help": help, "flag": flag, "aliases": aliases}
    )


def flag_name(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _parse_type(annotation: str) -> type | None:
    kinds = {part.strip() for part in annotation.split("|")} - {"None"}
    for kind in (bool, int, float):
        if kinds == {kind.__name__}:
            return kind
    return None


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
        if default is not None:
            help_text += f" (default: {default})" if help_text else f"default: {default}"
        options: dict[str, Any] = {"dest": field.name, "default": default, "help": help_text}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif kind is not None:
            options["type"] = kind
        group.add_argument(*names, **options)


def flag_values(namespace: argparse.Namespace, cls: type, skip: Iterable[str] = ()) -> dict:
    """The parsed values of the flags :func:`add_flags` made for ``cls``."""
    return {
        field.name: getattr(namespace, field.name)
        for field in dataclasses.fields(cls)
        if field.name not in skip and hasattr(namespace, field.name)
    }
