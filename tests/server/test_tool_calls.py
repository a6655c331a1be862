"""Tool calling on /v1/chat/completions: the request fields' checks (400s naming the field),
the schemas that force calls (checked with jsonschema), the chat template's view of tools
and of a history with calls, the flags, and real servers answering in OpenAI's shape.

The engine constrains forced calls with its grammar (engine/core/grammars.py): the HTTP
tests assert that the arguments follow the schema.
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import httpx
import jsonschema
import pytest

from metroline.engine.cli import parse_command_line
from metroline.engine.server.args import ServerArgs
from metroline.engine.server.errors import OpenAIError
from metroline.engine.server.protocol_chat import ChatCompletionRequest
from metroline.engine.server.routers.chat import _check, render_prompt
from metroline.engine.server.tool_calls import MAX_TOOLS_BYTES, plan_tools
from metroline.engine.server.tool_calls_response import answer_of
from metroline.engine.server.tool_calls_schema import forced_output, forced_schema

from .conftest import API_KEY

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"$ref": "#/$defs/u"}},
            "required": ["city", "unit"],
            "additionalProperties": False,
            "$defs": {"u": {"enum": ["C", "F"]}},
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
USER = [{"role": "user", "content": "Weather in Paris?"}]
AUTO_ARGS = ServerArgs(("m",), enable_auto_tool_choice=True, tool_call_parser="hermes")
PLAIN_ARGS = ServerArgs(("m",))
#: A template that shows the tools and each call's arguments (a dict: `.city` works).
TOOLS_TEMPLATE = (
    "{% if tools %}TOOLS {{ tools | map(attribute='function') | map(attribute='name') "
    "| join(',') }}\n{% endif %}"
    "{% for m in messages %}{{ m['role'] }}:"
    "{% for c in m.get('tool_calls', []) %} CALL {{ c.id }} {{ c.function.name }}"
    "({{ c.function.arguments.city }}) {{ c.function.arguments | tojson }}{% endfor %}"
    "{% if m.get('tool_call_id') %} [{{ m['tool_call_id'] }}]{% endif %}"
    " {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **fields})


def refused(args: ServerArgs = AUTO_ARGS, **fields) -> OpenAIError:
    body = request(**fields)
    with pytest.raises(OpenAIError) as caught:
        _check(SimpleNamespace(args=args), body)
    assert caught.value.status == 400
    return caught.value


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"tools": []}, "tools", "at least one"),
        ({"tools": [{"type": "function"}]}, "tools", "tools.0: function"),
        ({"tools": [{"type": "retrieval", "function": {"name": "a"}}]}, "tools", "tools.0"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools", "function.name"),
        ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools", "64"),
        ({"tools": [TIME, {"type": "function", "function": {"name": "a", "extra": 1}}]},
         "tools", "tools.1: function has no field 'extra'"),
        ({"tools": [{**TIME, "x": 1}]}, "tools", "unknown field 'x'"),
        ({"tools": [TIME, TIME]}, "tools", "second function named 'get_time'"),
        ({"tools": [{"type": "function", "function": {"name": "a", "parameters": []}}]},
         "tools", "JSON schema object"),
        ({"tools": [{"type": "function", "function": {"name": "a", "strict": "yes"}}]},
         "tools", "strict"),
        ({"tools": [{"type": "function", "function": {"name": "a", "description": 5}}]},
         "tools", "description"),
        ({"tools": [{"type": "function", "function": {"name": "a", "parameters": {
            "type": "object", "default": "x" * MAX_TOOLS_BYTES}}}]}, "tools", "bytes"),
        ({"tools": [{"type": "function", "function": {"name": "a", "parameters":
            json.loads("[" * 130 + "]" * 130)}}]}, "tools", "JSON schema object"),
        ({"tool_choice": "auto"}, "tool_choice", "`tools` must be set"),
        ({"tool_choice": "required"}, "tool_choice", "`tools` must be set"),
        ({"tools": [TIME], "tool_choice": "sometimes"}, "tool_choice", "'sometimes'"),
        ({"tools": [TIME], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice", "'nope', which is not in tools"),
        ({"tools": [TIME], "tool_choice": {"type": "function"}}, "tool_choice", "named"),
        ({"tools": [TIME], "tool_choice": {"type": "function", "function": {"name": "get_time"},
          "x": 1}}, "tool_choice", "nothing else"),
        ({"tools": [TIME], "tool_choice": "required", "response_format": {"type": "json_object"}},
         "response_format", "tool_choice required and response_format"),
        ({"tools": [TIME], "tool_choice": {"type": "function", "function": {"name": "get_time"}},
          "guided_regex": "a+"}, "guided_regex", "a named function and guided_regex"),
    ],
)  # fmt: skip
def test_bad_tool_fields_are_400s_naming_the_field(fields, param, words):
    error = refused(**fields)
    assert error.param == param and words in error.message, error.message


def test_auto_needs_the_servers_flags():
    """As vLLM: tools without a tool_choice mean "auto", which needs both flags."""
    error = refused(PLAIN_ARGS, tools=[TIME])
    assert error.param == "tool_choice"
    assert error.message == (
        '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
    )
    assert plan_tools(request(tools=[TIME], tool_choice="none"), PLAIN_ARGS).mode == "none"
    assert plan_tools(request(tools=[TIME], tool_choice="required"), PLAIN_ARGS).forced
    assert plan_tools(request(tool_choice="none"), PLAIN_ARGS) is None
    plan = plan_tools(request(tools=[TIME]), AUTO_ARGS)
    assert (plan.mode, plan.parser.name) == ("auto", "hermes")


def test_the_required_schema_takes_calls_of_the_tools_only():
    plan = plan_tools(request(tools=[WEATHER, TIME], tool_choice="required"), PLAIN_ARGS)
    schema = forced_schema(plan)
    validator = jsonschema.Draft202012Validator(schema)
    jsonschema.Draft202012Validator.check_schema(schema)
    good = [
        [{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "C"}}],
        [{"name": "get_time", "parameters": {}}, {"name": "get_time", "parameters": {"a": 1}}],
    ]
    bad = [
        [],
        [{"name": "get_weather", "parameters": {"city": "Rome", "unit": "C"}}],
        [{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "K"}}],  # via $defs
        [{"name": "get_weather", "parameters": {"city": "Oslo"}}],
        [{"name": "other", "parameters": {}}],
        [{"name": "get_time"}],
        [{"name": "get_time", "parameters": {}, "extra": 1}],
        {"name": "get_time", "parameters": {}},
    ]
    assert all(validator.is_valid(value) for value in good)
    assert not any(validator.is_valid(value) for value in bad)
    one = plan_tools(
        request(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False),
        PLAIN_ARGS,
    )
    assert not jsonschema.Draft202012Validator(forced_schema(one)).is_valid(good[1])
    assert forced_output(one).params.kind == "json"  # the engine's parameters take it


def test_the_named_schema_is_the_functions_parameters():
    choice = {"type": "function", "function": {"name": "get_weather"}}
    plan = plan_tools(request(tools=[WEATHER, TIME], tool_choice=choice), PLAIN_ARGS)
    validator = jsonschema.Draft202012Validator(forced_schema(plan))
    assert validator.is_valid({"city": "Paris", "unit": "F"})
    assert not validator.is_valid({"city": "Paris"})
    choice["function"]["name"] = "get_time"
    plan = plan_tools(request(tools=[WEATHER, TIME], tool_choice=choice), PLAIN_ARGS)
    assert forced_schema(plan) == {"type": "object", "properties": {}}
    assert answer_of(plan, '{"a": 1}', "stop").tool_calls[0].function.arguments == '{"a": 1}'


def test_conflicting_defs_are_a_400():
    other = json.loads(json.dumps(WEATHER))
    other["function"]["name"] = "other"
    other["function"]["parameters"]["$defs"]["u"] = {"enum": ["K"]}
    plan = plan_tools(request(tools=[WEATHER, other], tool_choice="required"), PLAIN_ARGS)
    with pytest.raises(OpenAIError, match=r"\$defs/u"):
        forced_schema(plan)
    other["function"]["parameters"]["$defs"] = 5
    plan = plan_tools(request(tools=[other], tool_choice="required"), PLAIN_ARGS)
    with pytest.raises(OpenAIError, match=r"parameters.\$defs must be an object"):
        forced_schema(plan)


def test_answers_follow_vllms_finish_reasons():
    required = plan_tools(request(tools=[TIME], tool_choice="required"), PLAIN_ARGS)
    answer = answer_of(required, '[{"name": "get_time", "parameters": {}}]', "stop")
    assert (answer.content, answer.finish_reason) == (None, "tool_calls")
    assert re.fullmatch(r"chatcmpl-tool-[0-9a-f]{32}", answer.tool_calls[0].id)
    cut = answer_of(required, '[{"name": "get_time", "param', "length")
    assert (cut.content, cut.tool_calls, cut.finish_reason) == (
        '[{"name": "get_time", "param',
        [],
        "length",
    )
    auto = plan_tools(request(tools=[TIME, WEATHER], parallel_tool_calls=False), AUTO_ARGS)
    two = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>' * 2
    answer = answer_of(auto, "Checking.\n" + two, "stop")
    assert (answer.content, len(answer.tool_calls), answer.finish_reason) == (
        "Checking.",
        1,
        "tool_calls",
    )
    assert answer_of(auto, "Just text.", "stop") == answer_of(None, "Just text.", "stop")
    mistral = ServerArgs(("m",), enable_auto_tool_choice=True, tool_call_parser="mistral")
    plan = plan_tools(request(tools=[TIME], tool_choice="required"), mistral)
    answer = answer_of(plan, '[{"name": "get_time", "parameters": {}}]', "stop")
    assert re.fullmatch(r"[A-Za-z0-9]{9}", answer.tool_calls[0].id)  # Mistral's template's


def test_the_chat_template_gets_the_tools_and_the_history(tiny_checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_checkpoint("llama")))
    tokenizer.chat_template = TOOLS_TEMPLATE
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "C"}'},
    }
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "-3 C"}]  # fmt: skip
    body = request(messages=messages, tools=[WEATHER, TIME], tool_choice="none")
    state = SimpleNamespace(args=PLAIN_ARGS)
    prompt = render_prompt(state, SimpleNamespace(tokenizer=tokenizer), body, _check(state, body))
    assert prompt == (
        "TOOLS get_weather,get_time\nuser: Weather in Paris?\n"
        'assistant: CALL c1 get_weather(Oslo) {"city": "Oslo", "unit": "C"} \n'
        "tool: [c1] -3 C\nassistant:"
    )
    call["function"]["arguments"] = "[1]"
    body = request(messages=messages[:2], tools=[TIME], tool_choice="none")
    with pytest.raises(OpenAIError) as caught:
        render_prompt(state, SimpleNamespace(tokenizer=tokenizer), body, _check(state, body))
    assert caught.value.param == "messages.1.tool_calls.0.function.arguments"


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "tool", "content": "x"}, "messages.0.tool_call_id"),
        ({"role": "user", "content": "x", "tool_call_id": "c"}, "messages.0.tool_call_id"),
        ({"role": "user", "content": "x", "tool_calls": []}, "messages.0.tool_calls"),
        ({"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
          "function": {"name": "f", "arguments": "{}", "x": 1}}]}, None),
    ],
)  # fmt: skip
def test_history_fields_on_the_wrong_role_are_400s(message, param):
    if param is None:  # an unknown field inside a call: kept aside for the 400 listing it
        body = request(messages=[message])
        assert body.messages[0].tool_calls[0].function.model_extra == {"x": 1}
        return
    assert refused(PLAIN_ARGS, messages=[message]).param == param


def test_the_flags():
    ns = parse_command_line(["serve", "m", "--enable-auto-tool-choice", "--tool-call-parser",
                             "mistral"])  # fmt: skip
    assert (ns.enable_auto_tool_choice, ns.tool_call_parser) == (True, "mistral")
    with pytest.raises(SystemExit) as caught:
        parse_command_line(["serve", "m", "--tool-call-parser", "pythonic"])
    assert caught.value.code == 2
    with pytest.raises(ValueError, match="needs --tool-call-parser"):
        ServerArgs(("m",), enable_auto_tool_choice=True)
    with pytest.raises(ValueError, match="llama3_json, hermes, mistral"):
        ServerArgs(("m",), tool_call_parser="pythonic")


@pytest.fixture(scope="module")
def tool_server(start_module_server, chat_checkpoint, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "tools.jinja"
    template.write_text(TOOLS_TEMPLATE)
    server = start_module_server(
        chat_checkpoint,
        "--max-model-len", "512", "--kv-cache-memory-bytes", str(2**23),
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
        "--chat-template", str(template), "--api-key", API_KEY,
    )  # fmt: skip
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=120) as http:
        yield http


def chat(http: httpx.Client, **fields) -> dict:
    body = {"model": "x", "messages": USER, "max_tokens": 300, "temperature": 0, **fields}
    body["model"] = http.get("/v1/models").json()["data"][0]["id"]
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_required_over_http_answers_tool_calls(tool_server):
    """tool_choice "required" answers in OpenAI's shape; the grammar makes the arguments
    follow the schema."""
    answer = chat(tool_server, tools=[WEATHER, TIME], tool_choice="required",
                  parallel_tool_calls=False)  # fmt: skip
    (choice,) = answer["choices"]
    message = choice["message"]
    assert message["role"] == "assistant"
    assert choice["finish_reason"] == "tool_calls", message
    assert message["content"] is None
    (call,) = message["tool_calls"]
    assert set(call) == {"id", "type", "function"} and call["type"] == "function"
    assert re.fullmatch(r"chatcmpl-tool-[0-9a-f]{32}", call["id"])
    name, arguments = call["function"]["name"], json.loads(call["function"]["arguments"])
    schema = (WEATHER if name == "get_weather" else TIME)["function"].get("parameters", {})
    jsonschema.validate(arguments, schema)


def test_named_and_streamed_calls_over_http(tool_server):
    named = {"type": "function", "function": {"name": "get_weather"}}
    answer = chat(tool_server, tools=[WEATHER], tool_choice=named)
    (call,) = answer["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    body = {"model": "x", "messages": USER, "max_tokens": 300, "temperature": 0,
            "tools": [WEATHER], "tool_choice": named, "stream": True}  # fmt: skip
    body["model"] = tool_server.get("/v1/models").json()["data"][0]["id"]
    with tool_server.stream("POST", "/v1/chat/completions", json=body) as reply:
        assert reply.status_code == 200
        events = [json.loads(line[6:]) for line in reply.iter_lines() if line[6:7] == "{"]
    pieces = [d["tool_calls"] for e in events for d in [e["choices"][0]["delta"]]
              if d.get("tool_calls")]  # fmt: skip
    first = pieces[0][0]
    assert (first["index"], first["type"], first["function"]["name"]) == (
        0,
        "function",
        "get_weather",
    )
    assert all(set(p[0]) == {"index", "function"} for p in pieces[1:])  # no nulls
    streamed = "".join(p[0]["function"].get("arguments", "") for p in pieces)
    assert streamed == call["function"]["arguments"]  # greedy: the same output
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_auto_and_none_over_http(tool_server):
    """A random model answers in text: with "auto" (the default) or "none" the text is
    the content, and the history with calls renders through the server's template."""
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "-3 C"}]  # fmt: skip
    for choice in (None, "none"):
        fields = {"tools": [WEATHER], "messages": messages, "max_tokens": 8}
        answer = chat(tool_server, **fields, **({"tool_choice": choice} if choice else {}))
        message = answer["choices"][0]["message"]
        assert message["tool_calls"] == [] and isinstance(message["content"], str)


def test_auto_without_the_flags_over_http(client):
    """The shared server has no tool flags: vLLM's 400."""
    body = {"model": "tiny", "messages": USER, "tools": [TIME]}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "tool_choice"
    body["tool_choice"] = "none"
    assert client.post("/v1/chat/completions", json={**body, "max_tokens": 2}).status_code == 200
