"""Tools are bounded before they are walked, describe objects, and refer only into their
own definitions (a forced call embeds them in a larger schema)."""

from __future__ import annotations

import pytest

from metroline.engine.server.errors import OpenAIError
from metroline.engine.server.tool_calls import MAX_TOOLS_BYTES, check_tools


def _tool(parameters: dict) -> dict:
    return {"type": "function", "function": {"name": "f", "parameters": parameters}}


def _refused(tools) -> str:
    with pytest.raises(OpenAIError) as caught:
        check_tools(tools)
    assert caught.value.status_code == 400
    return str(caught.value.body())


def test_tools_too_large_are_refused_without_walking_them(monkeypatch):
    import metroline.engine.server.tool_calls as tool_calls

    walked = []
    monkeypatch.setattr(tool_calls, "schema_depth", lambda value: walked.append(1) or 1)
    huge = _tool({"type": "object", "properties": {"x": {"enum": [0] * 2_000_000}}})
    assert "bytes of JSON" in _refused([huge])
    assert not walked
    near = _tool({"type": "object", "properties": {"x": {"enum": ["a" * 100] * 700}}})
    assert len(str(near)) > MAX_TOOLS_BYTES
    assert "bytes of JSON" in _refused([near])


@pytest.mark.parametrize("parameters", [{"type": "string"}, {"type": "array", "items": {}}])
def test_parameters_must_describe_an_object(parameters):
    assert "must describe an object" in _refused([_tool(parameters)])


@pytest.mark.parametrize("ref", ["#", "#/properties/x", "#/items"])
def test_local_refs_outside_the_definitions_are_refused(ref):
    schema = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"$ref": ref}}}
    assert "is not supported" in _refused([_tool(schema)])


def test_refs_into_the_definitions_are_taken():
    schema = {
        "type": "object",
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}}}},
        "properties": {"at": {"$ref": "#/$defs/point"}},
    }
    assert check_tools([_tool(schema)])[0]["function"]["name"] == "f"
