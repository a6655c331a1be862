"""Issue 19's acceptance through real HTTP: one ``metroline serve demo`` (the embedded demo
model: real weights, so its outputs are text) with prefix caching on and a KV pool small
enough that concurrent requests preempt one another.

- every bounded schema (benchmarks/structured_schemas.py), ``n=2`` at temperature 1,
  streamed and not, on both endpoints and through every field that carries a schema: each
  output stops by itself, parses and validates; ``/metrics`` counts preemptions;
- regexes and choices match;
- ``tool_choice`` ``"required"`` and named: parseable calls whose arguments validate;
- the official ``openai`` client's ``chat.completions.parse`` with a pydantic model;
- an always-true grammar leaves greedy output as it is.

The demo model is a small code model: where the grammar allows any whitespace (as
``response_format`` and ``guided_json`` do, up to ``MAX_JSON_WHITESPACE`` characters between
two elements) it writes much of it, so the schemas whose answers are long go through
``structured_outputs`` with ``disable_any_whitespace``.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field, conint, constr

from metroline.benchmarks.structured_schemas import SCHEMAS

from .conftest import metric_value

MODEL = "demo"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MAX_MODEL_LEN = 512
#: 96 blocks of 16 tokens of the demo model (6 layers x K and V x 4 heads x 32 x fp32 =
#: 6 KiB per token): the first test's requests need several times that, so they preempt.
KV_BYTES = 96 * 16 * 6 * 1024
MAX_TOKENS = 400
#: A prompt longer than one KV block, so that the requests share a cached prefix.
INSTRUCTION = (
    "You are a careful assistant that answers every question with one JSON value and "
    "nothing else: no prose, no code fences, no comments. Answer in JSON:"
)
MESSAGES = [{"role": "user", "content": INSTRUCTION}]
#: Schemas whose answers are short even with any whitespace go through response_format,
#: the others through structured_outputs with disable_any_whitespace.
RESPONSE_FORMAT = (0, 1, 2, 3, 5, 6, 9, 10, 11, 15)
#: A few also on /v1/completions through guided_json.
GUIDED_JSON = (2, 9, 16)
METRICS = 'model_name="demo"'


@pytest.fixture(scope="module")
def demo(start_module_server):
    server = start_module_server(
        MODEL,
        "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory-bytes", str(KV_BYTES),
        "--enable-prefix-caching",
    )  # fmt: skip
    with httpx.Client(base_url=server.url, timeout=300) as http:
        yield http


def json_request(index: int, path: str) -> dict[str, Any]:
    """Schema ``index``'s request body on ``path`` (its field as the module docstring says)."""
    schema = SCHEMAS[index]
    body: dict[str, Any] = {"model": MODEL, "n": 2, "temperature": 1, "seed": 100 + index,
                            "max_tokens": MAX_TOKENS}  # fmt: skip
    if path == COMPLETIONS:
        return {**body, "prompt": INSTRUCTION, "guided_json": schema}
    body["messages"] = MESSAGES
    if index in RESPONSE_FORMAT:
        name = f"schema_{index}"
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": name, "schema": schema, "strict": True},
        }
    else:
        body["structured_outputs"] = {"json": schema, "disable_any_whitespace": True}
    return body


def choices_of(http: httpx.Client, path: str, body: dict[str, Any], stream: bool) -> dict:
    """``{index: {"text", "finish_reason", "tool_calls"}}`` of one request; streamed, the
    deltas of each choice concatenated (tool-call arguments per call index)."""
    if not stream:
        response = http.post(path, json=body)
        assert response.status_code == 200, (body, response.text)
        result = {}
        for choice in response.json()["choices"]:
            message = choice.get("message") or {}
            result[choice["index"]] = {
                "text": choice["text"] if path == COMPLETIONS else message["content"],
                "finish_reason": choice["finish_reason"],
                "tool_calls": [c["function"] for c in message.get("tool_calls") or []],
            }
        return result
    result: dict[int, dict] = {}
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, (body, response.read())
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:])["choices"]:
                entry = result.setdefault(
                    choice["index"], {"text": "", "finish_reason": None, "tool_calls": []}
                )
                delta = choice.get("delta") or {}
                entry["text"] += choice.get("text") or delta.get("content") or ""
                for call in delta.get("tool_calls") or []:
                    calls = entry["tool_calls"]
                    if call["index"] == len(calls):
                        calls.append({"name": call["function"]["name"], "arguments": ""})
                    calls[call["index"]]["arguments"] += call["function"].get("arguments", "")
                entry["finish_reason"] = choice.get("finish_reason") or entry["finish_reason"]
    return result


def run_all(http: httpx.Client, requests: list[tuple[str, dict, bool]]) -> list[dict]:
    """Every ``(path, body, stream)`` at once (so that they share steps and preempt)."""
    with ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(choices_of, http, *request) for request in requests]
        return [future.result() for future in futures]


def test_every_schema_validates_under_preemption(demo):
    cases = [(index, CHAT) for index in range(len(SCHEMAS))]
    cases += [(index, COMPLETIONS) for index in GUIDED_JSON]
    cases = [(index, path, stream) for index, path in cases for stream in (False, True)]
    requests = [(path, json_request(index, path), stream) for index, path, stream in cases]
    for (index, path, stream), choices in zip(cases, run_all(demo, requests), strict=True):
        schema = SCHEMAS[index]
        assert sorted(choices) == [0, 1], (path, stream, choices)
        for choice in choices.values():
            where = (path, stream, schema, choice)
            assert choice["finish_reason"] == "stop", where
            jsonschema.validate(json.loads(choice["text"]), schema)
    metrics = demo.get("/metrics").text
    assert metric_value(metrics, "metroline:num_preemptions_total", METRICS) > 0
    assert metric_value(metrics, "metroline:prefix_cache_hits_total", METRICS) > 0


REGEXES = [r"[0-9]{3}-[a-z]{2,4}", r"(yes|no), because [a-z ]{1,20}\.", r"[A-Z][a-z]{0,5}"]
CHOICES = ["red", "green", "blue light", "a|b"]


def test_regexes_and_choices_match(demo):
    requests = []
    for path in (CHAT, COMPLETIONS):
        prompt = {"messages": MESSAGES} if path == CHAT else {"prompt": INSTRUCTION}
        for seed, regex in enumerate(REGEXES):
            for fields in ({"structured_outputs": {"regex": regex}}, {"guided_regex": regex}):
                requests.append((path, {**prompt, **fields, "seed": seed, "max_tokens": 60}))
        for fields in ({"structured_outputs": {"choice": CHOICES}}, {"guided_choice": CHOICES}):
            requests.append((path, {**prompt, **fields, "seed": 9, "max_tokens": 20}))
    requests = [
        (path, {"model": MODEL, "n": 2, "temperature": 1, **body}, stream)
        for path, body in requests
        for stream in (False, True)
    ]
    for (path, body, stream), choices in zip(requests, run_all(demo, requests), strict=True):
        constraint = body.get("structured_outputs") or body
        regex = constraint.get("regex") or constraint.get("guided_regex")
        for choice in choices.values():
            assert choice["finish_reason"] == "stop", (path, body, stream, choice)
            if regex is not None:
                assert re.fullmatch(regex, choice["text"]), (path, body, stream, choice)
            else:
                assert choice["text"] in CHOICES, (path, body, stream, choice)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "unit": {"$ref": "#/$defs/unit"},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
            "$defs": {"unit": {"enum": ["C", "F"]}},
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"hour_offset": {"type": "integer", "minimum": -12, "maximum": 14}},
            "required": ["hour_offset"],
            "additionalProperties": False,
        },
    },
}
TOOLS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, TIME)}


def test_forced_tool_calls_validate(demo):
    """``"required"`` with ``parallel_tool_calls: false`` (one call: with parallel calls the
    array has no bound, and the demo model may go on calling until ``max_tokens``) and a
    named function, several seeds (``n=2`` samples seeds ``seed`` and ``seed + 1``)."""
    named = {"type": "function", "function": {"name": "get_time"}}
    bodies = [{"tool_choice": "required", "seed": seed} for seed in (0, 10, 20)]
    bodies.append({"tool_choice": named, "seed": 30})
    base = {"model": MODEL, "messages": [{"role": "user", "content": "Weather in Oslo?"}],
            "tools": [WEATHER, TIME], "n": 2, "temperature": 1, "max_tokens": MAX_TOKENS,
            "parallel_tool_calls": False}  # fmt: skip
    requests = [(CHAT, {**base, **body}, stream) for body in bodies for stream in (False, True)]
    for (_, body, stream), choices in zip(requests, run_all(demo, requests), strict=True):
        for choice in choices.values():
            where = (body["tool_choice"], body["seed"], stream, choice)
            calls = choice["tool_calls"]
            assert calls and not choice["text"], where
            if body["tool_choice"] == "required":
                assert choice["finish_reason"] == "tool_calls" and len(calls) == 1, where
            else:
                assert choice["finish_reason"] == "stop", where
                assert [call["name"] for call in calls] == ["get_time"], where
            for call in calls:
                jsonschema.validate(json.loads(call["arguments"]), TOOLS[call["name"]])


class Pet(BaseModel):
    """Bounded fields only, so that every answer ends within ``max_tokens``."""

    name: constr(max_length=8)
    age: conint(ge=0, le=30)
    kind: Literal["cat", "dog"]
    vaccinated: bool
    tags: list[Annotated[str, Field(max_length=5)]] = Field(max_length=3)


def test_the_openai_clients_parse_returns_the_pydantic_model(demo):
    """The client sends a strict schema (``additionalProperties: false``, every field
    required, pydantic's ``title``s); any whitespace is allowed, hence the long answers."""
    sent: list[dict] = []

    def record(request: httpx.Request) -> None:
        sent.append(json.loads(request.content))

    http = httpx.Client(event_hooks={"request": [record]}, timeout=300)
    url = f"{str(demo.base_url).rstrip('/')}/v1"
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, http_client=http)
    with http:
        completion = client.chat.completions.parse(
            model=MODEL, messages=[{"role": "user", "content": "A pet as JSON:"}],
            response_format=Pet, temperature=1, seed=0, max_tokens=MAX_MODEL_LEN - 32,
        )  # fmt: skip
    fmt = sent[0]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    schema = fmt["json_schema"]["schema"]
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == set(Pet.model_fields)
    assert schema["properties"]["tags"]["maxItems"] == 3
    assert schema["properties"]["name"]["maxLength"] == 8
    (choice,) = completion.choices
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Pet), choice.message
    assert choice.message.parsed == Pet.model_validate_json(choice.message.content)


def test_an_always_true_grammar_leaves_greedy_output_unchanged(demo):
    """One request per side with all prompts (the same batch both times; each prompt under
    one KV block, so that the second request finds no cached prefix)."""
    prompts = ["Once upon a time", "def main():", "The capital of", "import os\n", "Hello,"]
    body = {"model": MODEL, "prompt": prompts, "temperature": 0, "max_tokens": 48}
    plain = choices_of(demo, COMPLETIONS, body, stream=False)
    anything = {**body, "structured_outputs": {"regex": r"[\s\S]*"}}
    constrained = choices_of(demo, COMPLETIONS, anything, stream=False)
    texts = [plain[index]["text"] for index in range(len(prompts))]
    assert [constrained[index]["text"] for index in range(len(prompts))] == texts
    assert all(texts)
    hello = [{"role": "user", "content": "Hello!"}]
    chat = {"model": MODEL, "messages": hello, "temperature": 0, "max_tokens": 48}
    plain = choices_of(demo, CHAT, chat, stream=False)
    anything = {**chat, "structured_outputs": {"regex": r"[\s\S]*"}}
    assert choices_of(demo, CHAT, anything, stream=False) == plain
