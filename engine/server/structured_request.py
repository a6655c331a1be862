"""Structured-output request fields, and their mapping onto the engine's
:class:`~metroline.engine.structured_outputs.StructuredOutputsParams`.

Both generation endpoints take, as vLLM does: OpenAI's ``response_format`` (``text``,
``json_object``, ``json_schema``), vLLM's ``structured_outputs`` object, and vLLM's older
``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` (with
``guided_decoding_backend`` and ``guided_whitespace_pattern``). :func:`structured_outputs_of`
turns them into at most one :class:`StructuredOutput` or answers 400 naming the field:

- at most one of them may ask for a structured output (two are a 400 naming both, where vLLM
  merges or picks one silently);
- what is not implemented is a 400 saying so, never accepted and dropped: the
  ``structural_tag`` response format and ``structured_outputs.structural_tag``, whitespace
  patterns, a backend other than ``xgrammar`` (or ``auto``);
- JSON schemas nest at most :data:`MAX_SCHEMA_DEPTH` levels (compiling grows with the square
  of the depth); sizes are bounded by ``StructuredOutputsParams`` (``MAX_SPEC_BYTES``,
  ``MAX_CHOICES``), which the string and list fields also state in the OpenAPI schema.

Whether the grammar itself compiles (a schema keyword xgrammar lacks, a regex that does not
parse) is checked where the request enters the engine; the 400 it becomes names
:attr:`StructuredOutput.param` (see ``admission.process``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field

from ..sampling_params import shorten
from ..structured_outputs import (
    MAX_CHOICES,
    MAX_SCHEMA_DEPTH,
    MAX_SPEC_BYTES,
    StructuredOutputsParams,
    schema_depth,
)
from .errors import bad_request
from .protocol import RequestModel

#: Backends ``guided_decoding_backend`` may name: there is one, xgrammar.
BACKENDS = ("auto", "xgrammar")
#: The old vLLM fields that each ask for a structured output, and the kind each gives.
GUIDED = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
_NOT_SUPPORTED = "is not supported (this server has no whitespace patterns or structural tags)"

#: A regex, an EBNF grammar, one choice, a schema's JSON text.
SpecStr = Annotated[str, Field(min_length=1, max_length=MAX_SPEC_BYTES)]
Choices = Annotated[list[SpecStr], Field(fail_fast=True, min_length=1, max_length=MAX_CHOICES)]
#: A JSON schema: an object, or its JSON text.
Schema = dict[str, Any] | SpecStr
#: A field this server refuses whenever it is set (not null).
Refused = Annotated[Any, Field(description="Not supported: a 400 when set.")]


class JsonSchemaFormat(RequestModel):
    """OpenAI's ``response_format.json_schema``."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(
        None, max_length=MAX_SPEC_BYTES, description="Accepted; not shown to the model."
    )
    schema_: dict[str, Any] = Field(alias="schema", description="The JSON schema to follow.")
    strict: bool | None = Field(None, description="Accepted; the output always follows the schema.")


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(None, description="With type json_schema.")


class StructuredOutputsRequest(RequestModel):
    """vLLM's ``structured_outputs``: exactly one of json, json_object, regex, choice,
    grammar."""

    json_: Schema | None = Field(None, alias="json")
    regex: SpecStr | None = None
    choice: Choices | None = None
    grammar: SpecStr | None = Field(None, description="EBNF, in xgrammar's dialect.")
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = Field(
        False, description="Accepted; objects never take properties their schema does not name."
    )
    disable_fallback: bool = Field(False, description="Accepted; there is no fallback backend.")
    whitespace_pattern: Refused = None
    structural_tag: Refused = None


class StructuredFields(RequestModel):
    """The structured-output fields of both generation endpoints."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: Schema | None = Field(None, description="Deprecated: structured_outputs.json.")
    guided_regex: SpecStr | None = Field(None, description="Deprecated: structured_outputs.regex.")
    guided_choice: Choices | None = Field(
        None, description="Deprecated: structured_outputs.choice."
    )
    guided_grammar: SpecStr | None = Field(
        None, description="Deprecated: structured_outputs.grammar."
    )
    guided_decoding_backend: str | None = Field(
        None, max_length=64, description="auto or xgrammar (the only backend)."
    )
    guided_whitespace_pattern: Refused = None


@dataclass(frozen=True)
class StructuredOutput:
    """What a request's output must match, and the request field it came from (the
    ``param`` of a 400 about it, e.g. when its grammar does not compile)."""

    params: StructuredOutputsParams
    param: str


def structured_sources(body: StructuredFields) -> list[str]:
    """The request fields that ask for a structured output, in a fixed order (cheap: for
    callers that must refuse a combination, e.g. with a forced tool call)."""
    sources = []
    if body.response_format is not None and body.response_format.type != "text":
        sources.append("response_format")
    if body.structured_outputs is not None:
        sources.append("structured_outputs")
    return sources + [name for name in GUIDED if getattr(body, name) is not None]


def structured_outputs_of(body: StructuredFields) -> StructuredOutput | None:
    """The request's structured output (None: free text); 400 naming the field for anything
    refused, two sources at once, or parameters ``StructuredOutputsParams`` refuses."""
    _refuse_unsupported(body)
    sources = structured_sources(body)
    if len(sources) > 1:
        raise bad_request(
            f"{' and '.join(sources)} both ask for a structured output; give only one of them",
            param=sources[1],
        )
    if not sources:
        return None
    if sources[0] == "response_format":
        return _of_response_format(body.response_format)
    if sources[0] == "structured_outputs":
        return _of_structured_outputs(body.structured_outputs)
    name = sources[0]
    value = getattr(body, name)
    if name == "guided_json":
        value = _schema(value, name)
    return _params(name, **{GUIDED[name]: value})


def _refuse_unsupported(body: StructuredFields) -> None:
    if body.guided_whitespace_pattern is not None:
        raise bad_request(
            f"guided_whitespace_pattern {_NOT_SUPPORTED}", param="guided_whitespace_pattern"
        )
    backend = body.guided_decoding_backend
    if backend is not None and backend not in BACKENDS:
        raise bad_request(
            f"guided_decoding_backend {shorten(backend, 64)!r} is not available: this server's "
            "only backend is xgrammar (give 'xgrammar' or 'auto', or leave it out)",
            param="guided_decoding_backend",
        )
    fields = body.structured_outputs
    for name in ("whitespace_pattern", "structural_tag"):
        if fields is not None and getattr(fields, name) is not None:
            raise bad_request(
                f"structured_outputs.{name} {_NOT_SUPPORTED}", param=f"structured_outputs.{name}"
            )
    response_format = body.response_format
    if response_format is None:
        return
    if response_format.type == "json_schema" and response_format.json_schema is None:
        raise bad_request(
            'response_format {"type": "json_schema"} needs json_schema: {"name": ..., '
            '"schema": {...}}',
            param="response_format.json_schema",
        )
    if response_format.type != "json_schema" and response_format.json_schema is not None:
        raise bad_request(
            f"response_format.json_schema is only for type json_schema, not {response_format.type}",
            param="response_format.json_schema",
        )


def _of_response_format(response_format: ResponseFormat) -> StructuredOutput:
    if response_format.type == "json_object":
        return _params("response_format", json_object=True)
    param = "response_format.json_schema.schema"
    return _params(param, json=_schema(response_format.json_schema.schema_, param))


def _of_structured_outputs(fields: StructuredOutputsRequest) -> StructuredOutput:
    params = _params(
        "structured_outputs",
        json=None if fields.json_ is None else _schema(fields.json_, "structured_outputs.json"),
        json_object=bool(fields.json_object),
        regex=fields.regex,
        choice=fields.choice,
        grammar=fields.grammar,
        disable_any_whitespace=fields.disable_any_whitespace,
        disable_additional_properties=fields.disable_additional_properties,
        disable_fallback=fields.disable_fallback,
    )
    return StructuredOutput(params.params, f"structured_outputs.{params.params.kind}")


def _params(param: str, **fields: Any) -> StructuredOutput:
    try:
        return StructuredOutput(StructuredOutputsParams(**fields), param)
    except ValueError as error:
        raise bad_request(f"{param}: {error}", param=param) from None


def _schema(value: dict[str, Any] | str, param: str) -> Any:
    """A JSON schema from the request: parsed when given as text, at most
    :data:`MAX_SCHEMA_DEPTH` levels deep."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except RecursionError:
            raise bad_request(f"{param} is nested too deeply", param=param) from None
        except ValueError as error:
            raise bad_request(f"{param} is not valid JSON: {error}", param=param) from None
    if schema_depth(value) > MAX_SCHEMA_DEPTH:
        raise bad_request(
            f"{param} nests arrays and objects more than {MAX_SCHEMA_DEPTH} levels deep",
            param=param,
        )
    return value
