"""Structured-output request fields (engine/server/structured_request.py): every field on
both endpoints maps onto one ``StructuredOutputsParams``, and every refusal is a 400 whose
``param`` names the field. The mapping is tested on the parsed request models; the refusals
pydantic makes, the grammar check where requests enter the engine and a constrained answer
are tested on the shared server (tiny llama, see conftest)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from metroline.engine.sampling_params import SamplingParams
from metroline.engine.server import admission
from metroline.engine.server.errors import OpenAIError
from metroline.engine.server.protocol_chat import ChatCompletionRequest
from metroline.engine.server.protocol_completions import CompletionRequest
from metroline.engine.server.structured_request import (
    MAX_SCHEMA_DEPTH,
    StructuredOutput,
    schema_depth,
    structured_outputs_of,
    structured_sources,
)
from metroline.engine.structured_outputs import MAX_CHOICES, StructuredOutputsParams

from .conftest import MODEL_NAME

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
BASES = {
    COMPLETIONS: {"model": MODEL_NAME, "prompt": "hello", "max_tokens": 8},
    CHAT: {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
}
MODELS = {COMPLETIONS: CompletionRequest, CHAT: ChatCompletionRequest}
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}
both = pytest.mark.parametrize("path", [COMPLETIONS, CHAT])


def parsed(path: str, **fields):
    return MODELS[path].model_validate({**BASES[path], **fields})


def mapped(path: str, **fields) -> StructuredOutput | None:
    return structured_outputs_of(parsed(path, **fields))


def refused(path: str, **fields) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        mapped(path, **fields)
    assert info.value.status == 400
    return info.value


@both
def test_no_field_and_text_mean_free_text(path):
    assert mapped(path) is None
    assert mapped(path, response_format={"type": "text"}) is None
    assert mapped(path, guided_decoding_backend="xgrammar") is None
    assert mapped(path, response_format={"type": "text"}, guided_decoding_backend="auto") is None


@both
@pytest.mark.parametrize(
    ("fields", "expected", "param"),
    [
        ({"response_format": {"type": "json_object"}}, {"json_object": True}, "response_format"),
        (
            {"response_format": {**JSON_SCHEMA, "json_schema": {
                **JSON_SCHEMA["json_schema"], "strict": True, "description": "d"}}},
            {"json": SCHEMA},
            "response_format.json_schema.schema",
        ),
        ({"structured_outputs": {"json": SCHEMA}}, {"json": SCHEMA}, "structured_outputs.json"),
        (
            {"structured_outputs": {"json": json.dumps(SCHEMA), "disable_any_whitespace": True}},
            {"json": SCHEMA, "disable_any_whitespace": True},
            "structured_outputs.json",
        ),
        (
            {"structured_outputs": {"json_object": True, "disable_fallback": True,
                                    "disable_additional_properties": True}},
            {"json_object": True, "disable_fallback": True, "disable_additional_properties": True},
            "structured_outputs.json_object",
        ),
        ({"structured_outputs": {"regex": "[a-z]+"}}, {"regex": "[a-z]+"},
         "structured_outputs.regex"),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, {"choice": ["yes", "no"]},
         "structured_outputs.choice"),
        ({"structured_outputs": {"grammar": 'root ::= "a"', "json_object": False}},
         {"grammar": 'root ::= "a"'}, "structured_outputs.grammar"),
        ({"guided_json": SCHEMA}, {"json": SCHEMA}, "guided_json"),
        ({"guided_json": json.dumps(SCHEMA)}, {"json": SCHEMA}, "guided_json"),
        ({"guided_regex": r"\d+", "guided_decoding_backend": "auto"}, {"regex": r"\d+"},
         "guided_regex"),
        ({"guided_choice": ["a", "b"]}, {"choice": ["a", "b"]}, "guided_choice"),
        ({"guided_grammar": 'root ::= "x"'}, {"grammar": 'root ::= "x"'}, "guided_grammar"),
    ],
)  # fmt: skip
def test_every_field_maps_onto_structured_outputs(path, fields, expected, param):
    structured = mapped(path, **fields)
    assert structured == StructuredOutput(StructuredOutputsParams(**expected), param)
    # It reaches the engine's sampling parameters.
    params = admission.sampling_params(parsed(path, **fields), 8, None, {}, {}, structured)
    assert params.structured_outputs == structured.params


@both
@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema",
         "needs json_schema"),
        ({"response_format": {"type": "text", "json_schema": JSON_SCHEMA["json_schema"]}},
         "response_format.json_schema", "only for type json_schema"),
        ({"response_format": {"type": "json_object", "json_schema": JSON_SCHEMA["json_schema"]}},
         "response_format.json_schema", "only for type json_schema"),
        ({"structured_outputs": {"regex": "a", "whitespace_pattern": " *"}},
         "structured_outputs.whitespace_pattern", "not supported"),
        ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag",
         "not supported"),
        ({"guided_regex": "a", "guided_whitespace_pattern": " "}, "guided_whitespace_pattern",
         "not supported"),
        ({"guided_regex": "a", "guided_decoding_backend": "outlines"}, "guided_decoding_backend",
         "only backend is xgrammar"),
        ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {"json_object": False}}, "structured_outputs", "got none"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs",
         "got regex, choice"),
        ({"structured_outputs": {"choice": ["x" * 300] * MAX_CHOICES}}, "structured_outputs",
         "larger than"),
        ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
        ({"guided_json": "[1]"}, "guided_json", "must be a JSON object"),
        ({"structured_outputs": {"json": '{"a": NaN}'}}, "structured_outputs",
         "cannot be written as JSON"),
        ({"response_format": JSON_SCHEMA, "guided_regex": "a"}, "guided_regex",
         "response_format and guided_regex both"),
        ({"structured_outputs": {"regex": "a"}, "guided_json": SCHEMA}, "guided_json",
         "structured_outputs and guided_json both"),
        ({"guided_json": SCHEMA, "guided_choice": ["a"]}, "guided_choice",
         "guided_json and guided_choice both"),
        ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
         "structured_outputs", "response_format and structured_outputs both"),
    ],
)  # fmt: skip
def test_refusals_name_the_field(path, fields, param, words):
    error = refused(path, **fields)
    assert error.param == param and words in error.message, error.message


def nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth - 1):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize(
    "fields",
    [
        lambda s: {"response_format": {"type": "json_schema", "json_schema": {"name": "n",
                                                                             "schema": s}}},
        lambda s: {"structured_outputs": {"json": json.dumps(s)}},
        lambda s: {"guided_json": s},
    ],
)  # fmt: skip
def test_schemas_nest_a_bounded_depth(fields):
    assert mapped(CHAT, **fields(nested(MAX_SCHEMA_DEPTH))) is not None
    error = refused(CHAT, **fields(nested(MAX_SCHEMA_DEPTH + 1)))
    assert str(MAX_SCHEMA_DEPTH) in error.message
    assert error.param.split(".")[0] in ("response_format", "structured_outputs", "guided_json")
    deep_text = "[" * 5000 + "]" * 5000
    assert refused(COMPLETIONS, guided_json=deep_text).param == "guided_json"


def test_schema_depth_counts_arrays_and_objects():
    assert schema_depth(1) == 0 and schema_depth({}) == 1 and schema_depth([{"a": [2]}]) == 3
    assert schema_depth(nested(10_000)) == 10_000  # iterative: no recursion limit


def test_structured_sources_name_every_field_given():
    body = parsed(
        CHAT, response_format=JSON_SCHEMA, structured_outputs={"regex": "a"}, guided_choice=["a"]
    )
    assert structured_sources(body) == ["response_format", "structured_outputs", "guided_choice"]
    assert structured_sources(parsed(CHAT, response_format={"type": "text"})) == []


class FailingProcessor:
    def __init__(self, message: str) -> None:
        self.message = message

    def process(self, *args):
        raise ValueError(self.message)


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ("invalid structured output regex: unmatched (", "guided_regex"),
        ("structured outputs need a tokenizer; this model has none", "guided_regex"),
        ("the prompt has a token id 99999 outside the vocabulary", "prompt"),
        ("max_tokens must be at least 1", "max_tokens"),
    ],
)
def test_engine_refusals_of_a_structured_output_name_its_field(message, param):
    engine = SimpleNamespace(input_processor=FailingProcessor(message))
    structured = StructuredOutput(StructuredOutputsParams(regex="("), "guided_regex")
    params = SamplingParams(structured_outputs=structured.params)
    with pytest.raises(OpenAIError) as info:
        admission.process(engine, "r", [1], params, "prompt", None, structured)
    assert info.value.param == param and info.value.message == message


def test_the_openapi_schema_lists_the_fields_on_both_endpoints():
    for model in MODELS.values():
        schema = model.model_json_schema(by_alias=True)
        fields = set(schema["properties"])
        assert {"response_format", "structured_outputs", "guided_json", "guided_regex",
                "guided_choice", "guided_grammar", "guided_decoding_backend",
                "guided_whitespace_pattern"} <= fields  # fmt: skip
        definitions = schema["$defs"]
        assert set(definitions["StructuredOutputsRequest"]["properties"]) >= {
            "json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace",
            "disable_additional_properties", "disable_fallback",
        }  # fmt: skip
        assert definitions["ResponseFormat"]["properties"]["type"]["enum"] == [
            "text", "json_object", "json_schema",
        ]  # fmt: skip
        assert "schema" in definitions["JsonSchemaFormat"]["required"]


# --- through the server ---------------------------------------------------------------------


def post(client, path: str, **fields):
    return client.post(path, json={**BASES[path], **fields})


def error_of(response) -> dict:
    assert response.status_code == 400, response.text
    return response.json()["error"]


@both
def test_the_server_refuses_what_the_models_refuse(client, path):
    error = error_of(post(client, path, response_format={"type": "structural_tag"}))
    assert error["param"] == "response_format.type"
    assert "'text', 'json_object' or 'json_schema'" in error["message"]
    fmt = {"type": "json_schema", "json_schema": {"schema": SCHEMA}}
    assert error_of(post(client, path, response_format=fmt))["param"] == (
        "response_format.json_schema.name"
    )
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": "{}"}}
    assert error_of(post(client, path, response_format=fmt))["param"] == (
        "response_format.json_schema.schema"
    )
    for field, value in [("response_format", {"type": "text", "x": 1}),
                         ("structured_outputs", {"regex": "a", "x": 1}),
                         ("response_format", {**JSON_SCHEMA, "json_schema": {
                             **JSON_SCHEMA["json_schema"], "x": 1}})]:  # fmt: skip
        error = error_of(post(client, path, **{field: value}))
        assert error["code"] == "unknown_field" and error["param"].endswith(".x")
        assert error["param"].startswith(field)
    assert error_of(post(client, path, guided_choice=[]))["param"] == "guided_choice"
    assert error_of(post(client, path, guided_regex=""))["param"] == "guided_regex"
    assert error_of(post(client, path, guided_json=5))["param"] == "guided_json"
    error = error_of(post(client, path, guided_regex="a", response_format={"type": "json_object"}))
    assert error["param"] == "guided_regex"
    error = error_of(post(client, path, structured_outputs={"structural_tag": "{}"}))
    assert error["param"] == "structured_outputs.structural_tag"


@both
def test_grammars_that_do_not_compile_are_a_400_naming_the_field(client, path):
    cases = [
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"structured_outputs": {"grammar": "root ::= missing"}}, "structured_outputs.grammar"),
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "n", "schema": {"type": "no-such-type"}}}},
         "response_format.json_schema.schema"),
    ]  # fmt: skip
    for fields, param in cases:
        error = error_of(post(client, path, **fields))
        assert error["param"] == param and "structured output" in error["message"], error


@both
def test_a_structured_answer_follows_its_constraint(client, path):
    reply = post(client, path, guided_choice=["yes", "no"], max_tokens=16)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    text = choice["text"] if path == COMPLETIONS else choice["message"]["content"]
    assert text in ("yes", "no") and choice["finish_reason"] == "stop", choice
    # A schema is accepted (the tiny model's 8 tokens may not finish the object).
    reply = post(client, path, response_format=JSON_SCHEMA)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    text = choice["text"] if path == COMPLETIONS else choice["message"]["content"]
    assert text.lstrip()[:1] in ("{", ""), text
