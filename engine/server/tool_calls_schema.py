"""The JSON schemas that force tool calls through the engine's grammar (vLLM's):

- ``tool_choice: "required"``: an array of at least one (with ``parallel_tool_calls:
  false``, exactly one) ``{"name": NAME, "parameters": ARGUMENTS}`` object, where each item
  is one of the tools (``anyOf``): the name a ``const`` and the arguments that tool's
  parameters schema;
- a named function: that function's parameters schema; the output is the arguments.

A parameters schema's ``$defs`` (and ``definitions``) move to the top of the array schema,
where its ``$ref``s point (``#/$defs/...`` resolve against the root); two tools defining one
name differently are a 400.
"""

from __future__ import annotations

import copy
from typing import Any

from ..structured_outputs import StructuredOutputsParams
from .errors import bad_request
from .structured_request import StructuredOutput
from .tool_calls import ToolPlan

_DEFINITIONS = ("$defs", "definitions")


def forced_schema(plan: ToolPlan) -> dict[str, Any] | None:
    """The schema the output must match, or None when nothing is forced."""
    if plan.mode == "named":
        return plan.parameters_of(plan.function)
    if plan.mode != "required":
        return None
    hoisted: dict[str, dict[str, Any]] = {key: {} for key in _DEFINITIONS}
    items = []
    for tool in plan.tools:
        name = tool["function"]["name"]
        parameters = copy.copy(plan.parameters_of(name))
        for key in _DEFINITIONS:
            definitions = parameters.pop(key, None) or {}
            if not isinstance(definitions, dict):
                raise bad_request(f"tools: {name}'s parameters.{key} must be an object", "tools")
            for def_name, definition in definitions.items():
                if hoisted[key].setdefault(def_name, definition) != definition:
                    raise bad_request(
                        f"tools define {key}/{def_name} differently; with tool_choice "
                        "'required' their definitions share one namespace",
                        "tools",
                    )
        items.append(
            {
                "type": "object",
                "properties": {"name": {"const": name}, "parameters": parameters},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if not plan.parallel:
        schema["maxItems"] = 1
    schema.update({key: value for key, value in hoisted.items() if value})
    return schema


def forced_output(plan: ToolPlan | None) -> StructuredOutput | None:
    """The structured output that forces the plan's calls (its errors name ``tools``)."""
    schema = None if plan is None else forced_schema(plan)
    if schema is None:
        return None
    try:
        return StructuredOutput(StructuredOutputsParams(json=schema), "tools")
    except ValueError as error:
        raise bad_request(f"tools: {error}", "tools") from None


def check_exclusive(plan: ToolPlan | None, sources: list[str]) -> None:
    """A forced call is the request's structured output: 400 naming both when the request
    also asks for one (``sources``: its ``response_format``, ``structured_outputs`` or
    ``guided_*`` fields that do)."""
    if plan is not None and plan.forced and sources:
        choice = "required" if plan.mode == "required" else "a named function"
        raise bad_request(
            f"tool_choice {choice} and {sources[0]} both ask for a structured output; give "
            "only one of them",
            sources[0],
        )
