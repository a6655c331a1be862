"""Cross-field rules written once: CEL for the API server, a Python twin for the operator.

A ``CelRule`` becomes an ``x-kubernetes-validations`` entry of the CRD (``cel_validations``)
and is judged on the parsed model by ``rule_problems``. The helpers here spell property names
as Kubernetes CEL escapes them and guard every call of Kubernetes' ``quantity()`` (CEL library
of Kubernetes 1.29+) so that it only sees strings without a long exponent: the API server
evaluates CEL rules even when a pattern failed, and its parser's cost grows with the exponent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import quantity as q

_CEL_RESERVED = frozenset({
    "true", "false", "null", "in", "as", "break", "const", "continue", "else", "for",
    "function", "if", "import", "let", "loop", "package", "namespace", "return",
})


@dataclass(frozen=True)
class CelRule:
    """One cross-field rule: CEL for the API server, a Python twin for the operator.

    ``holds`` judges the parsed model; ``detail``, if given, words a failure with the values
    (the CEL ``message`` is static)."""

    rule: str
    message: str
    holds: Callable[[Any], bool]
    detail: Callable[[Any], str] | None = None


def rule_problems(value: Any, rules: tuple[CelRule, ...]) -> list[str]:
    """The failure message of every rule of ``rules`` that ``value`` breaks."""
    return [r.detail(value) if r.detail else r.message for r in rules if not r.holds(value)]


def cel_validations(rules: tuple[CelRule, ...]) -> dict[str, Any]:
    """``rules`` as a model's ``json_schema_extra``: the CRD's ``x-kubernetes-validations``."""
    return {"x-kubernetes-validations": [{"rule": r.rule, "message": r.message} for r in rules]}


def cel_name(name: str) -> str:
    """A property name as Kubernetes CEL spells it (``ephemeral-storage`` is
    ``ephemeral__dash__storage``; k8s.io/apiserver/pkg/cel escaping rules)."""
    if name in _CEL_RESERVED:
        return f"__{name}__"
    for plain, escaped in (("__", "__underscores__"), (".", "__dot__"), ("-", "__dash__"),
                           ("/", "__slash__")):
        name = name.replace(plain, escaped)
    return name


def cel_safe_quantity(path: str) -> str:
    """CEL: ``path`` (an int-or-string) may be handed to ``quantity()`` at bounded cost."""
    return f"(type({path}) == int || !{path}.matches('{q.UNSAFE_EXPONENT}'))"


def cel_quantity(path: str) -> str:
    return f"quantity(string({path}))"


def cel_if_safe(paths: tuple[str, ...], test: str) -> str:
    """CEL: ``test`` (which calls ``quantity()`` on ``paths``) where every path is safe to
    parse, else true (the pattern reports those). A conditional, not ``||``: CEL evaluates only
    the chosen branch of ``?:``, while ``||`` may evaluate both sides."""
    safe = " && ".join(cel_safe_quantity(p) for p in paths)
    return f"({safe} ? {test} : true)"
