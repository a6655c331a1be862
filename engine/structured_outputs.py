"""Structured outputs: what a request's output must match (vLLM's ``StructuredOutputsParams``).

One of a JSON schema, any JSON object, a regular expression, a choice of strings or an EBNF
grammar (xgrammar's dialect). The engine turns it into a token bitmask each step
(``engine/core/grammars.py``); this module is the part both sides share: the parameters,
their bounds, and the tokenizer-free check that the grammar can be built (run where requests
enter, so an invalid schema is a 400 naming the problem, never a failure in the core).

Invariants after construction: exactly one kind is set; the specification (schema text,
regex, choices, grammar) is at most :data:`MAX_SPEC_BYTES` UTF-8 bytes in all, a schema
nests at most :data:`MAX_SCHEMA_DEPTH` levels, and a choice holds 1 to :data:`MAX_CHOICES`
strings. ``key`` is equal for parameters that compile to the
same grammar (the core's compile cache is keyed by it).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

#: Most bytes of a grammar's specification (a schema's JSON text, a regex, the choices, an
#: EBNF grammar): compiling grows faster than linearly with it (a schema of 800 properties,
#: 64 KiB, compiles in about half a minute).
MAX_SPEC_BYTES = 64 * 1024
#: Most levels of arrays and objects in a JSON schema (the schema object itself is one):
#: compiling grows with the square of the depth.
MAX_SCHEMA_DEPTH = 128
#: Most strings in a ``choice``.
MAX_CHOICES = 1024
#: Most whitespace characters the JSON grammars allow between two elements (vLLM allows any
#: number: a model that keeps emitting spaces never finishes).
MAX_JSON_WHITESPACE = 32

KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Set exactly one of ``json`` (a JSON schema: a dict or its JSON text),
    ``json_object`` (any JSON object, as OpenAI's ``json_object``: not an array or a
    scalar), ``regex``, ``choice`` (the output is one of these strings) or ``grammar``
    (EBNF). ``disable_any_whitespace`` keeps JSON to single spaces after ``,`` and ``:``;
    ``disable_additional_properties`` and ``disable_fallback`` are accepted as vLLM spells
    them and change nothing here: objects never take properties their schema does not name
    (xgrammar's strict mode) and there is one backend, with no fallback."""

    json: str | dict[str, Any] | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    disable_fallback: bool = False
    #: The schema as JSON text (normalised), or the other kind's text; set on construction.
    key: tuple[str, str, bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_kinds = [kind for kind in KINDS if getattr(self, kind) not in (None, False)]
        if len(set_kinds) != 1:
            raise ValueError(
                "structured outputs take exactly one of json, json_object, regex, choice or "
                f"grammar; got {', '.join(set_kinds) if set_kinds else 'none'}"
            )
        for name in (
            "json_object",
            "disable_any_whitespace",
            "disable_additional_properties",
            "disable_fallback",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"structured outputs' {name} must be a boolean")
        kind = set_kinds[0]
        object.__setattr__(self, "key", (kind, _spec_text(self, kind), self.disable_any_whitespace))
        if len(self.key[1].encode()) > MAX_SPEC_BYTES:
            raise ValueError(
                f"the structured output's {kind} is larger than {MAX_SPEC_BYTES} bytes"
            )

    @property
    def kind(self) -> str:
        return self.key[0]


def _spec_text(params: StructuredOutputsParams, kind: str) -> str:
    if kind == "json":
        schema = params.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except (ValueError, RecursionError) as error:
                raise ValueError(f"the JSON schema is not valid JSON: {error}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError("a JSON schema must be a JSON object (or true/false)")
        if schema_depth(schema) > MAX_SCHEMA_DEPTH:
            raise ValueError(
                f"the JSON schema nests arrays and objects more than {MAX_SCHEMA_DEPTH} levels"
            )
        try:
            return json.dumps(schema, ensure_ascii=False, allow_nan=False)
        except (ValueError, TypeError, RecursionError) as error:
            raise ValueError(f"the JSON schema cannot be written as JSON: {error}") from None
    if kind == "json_object":
        return ""
    if kind == "choice":
        choices = params.choice
        if (
            not isinstance(choices, (list, tuple))
            or not 0 < len(choices) <= MAX_CHOICES
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise ValueError(f"choice must be a list of 1 to {MAX_CHOICES} non-empty strings")
        return json.dumps(list(choices), ensure_ascii=False)
    text = getattr(params, kind)
    if not isinstance(text, str) or not text:
        raise ValueError(f"{kind} must be a non-empty string")
    return text


def check_grammar(params: StructuredOutputsParams) -> None:
    """Raise ``ValueError`` if :func:`build_grammar` would (parameters that passed are
    remembered: the last :data:`CHECKED_CACHE_SIZE`)."""
    _checked(params.key)


#: Grammars :func:`check_grammar` remembers as valid.
CHECKED_CACHE_SIZE = 256


@functools.lru_cache(maxsize=CHECKED_CACHE_SIZE)
def _checked(key: tuple[str, str, bool]) -> None:
    _grammar_of(*key)


def schema_depth(value: Any) -> int:
    """Levels of arrays and objects in a JSON value (0 for a scalar); iterative, so any
    depth the JSON parser took is measured without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def build_grammar(params: StructuredOutputsParams) -> Any:
    """The tokenizer-free ``xgrammar.Grammar`` of ``params``; raises ``ValueError`` naming
    what is wrong (an unsupported schema keyword, a regex that does not parse, an undefined
    EBNF rule). The core compiles the same grammar against the tokenizer."""
    return _grammar_of(*params.key)


def _grammar_of(kind: str, text: str, compact: bool) -> Any:
    import xgrammar

    try:
        if kind in ("json", "json_object"):
            schema = text if kind == "json" else '{"type": "object"}'
            return _strict_strings(
                xgrammar.Grammar.from_json_schema(schema, **json_format(compact))
            )
        if kind == "regex":
            return xgrammar.Grammar.from_regex(text)
        if kind == "choice":
            return xgrammar.Grammar.from_regex(choice_regex(json.loads(text)))
        return xgrammar.Grammar.from_ebnf(text)
    except (RuntimeError, ValueError, TypeError) as error:
        raise ValueError(f"invalid structured output {kind}: {_reason(error)}") from None


#: The character classes xgrammar 0.2.9 gives the characters of JSON strings: with a length
#: bound it lets raw control characters through, which JSON forbids, and both let UTF-16
#: surrogates (U+D800 to U+DFFF) through, whose UTF-8 bytes are no valid text.
_STRING_CHARACTERS = {
    r"[^\"\\\r\n]": r"[^\0-\x1f\"\\\r\n\uD800-\uDFFF]",
    r"[^\0-\x1f\"\\\r\n]": r"[^\0-\x1f\"\\\r\n\uD800-\uDFFF]",
}


def _strict_strings(grammar: Any) -> Any:
    """``grammar`` whose JSON strings hold only valid JSON text: no raw control character
    and no UTF-16 surrogate."""
    import xgrammar

    text = str(grammar)
    strict = text
    for lax, allowed in _STRING_CHARACTERS.items():
        strict = strict.replace(lax, allowed)
    return grammar if strict == text else xgrammar.Grammar.from_ebnf(strict)


def json_format(compact: bool) -> dict[str, Any]:
    """xgrammar's JSON layout options: compact, or any whitespace up to
    :data:`MAX_JSON_WHITESPACE` characters between elements."""
    if compact:
        return {"any_whitespace": False}
    return {"any_whitespace": True, "max_whitespace_cnt": MAX_JSON_WHITESPACE}


def choice_regex(choices: list[str]) -> str:
    """A regex matching exactly one of ``choices`` (each matched literally)."""
    return "(" + "|".join(_escape_regex(choice) for choice in choices) + ")"


def _escape_regex(text: str) -> str:
    special = set(r"\^$.|?*+()[]{}/-")
    return "".join("\\" + ch if ch in special else ch for ch in text)


def _reason(error: Exception) -> str:
    """xgrammar's message without its C++ source location prefix."""
    message = str(error).strip()
    if message.startswith("[") and "]" in message:
        message = message.split("]", 1)[1].strip()
        head, _, rest = message.partition(": ")
        if ".cc:" in head or ".h:" in head:
            message = rest
    return message[:500] or type(error).__name__
