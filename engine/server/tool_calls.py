"""Tool calling on ``/v1/chat/completions``, as vLLM does it: what a request's ``tools``,
``tool_choice`` and ``parallel_tool_calls`` ask for (:class:`ToolPlan`), checked up front so
that a bad one is a 400 naming the field.

- ``tool_choice`` defaults to ``"auto"`` when ``tools`` are given, else ``"none"``; any
  other value needs ``tools``.
- ``"none"``: plain content (the tools are still shown to the chat template, as vLLM does).
- ``"auto"``: the model decides; its text is read by the server's ``--tool-call-parser``.
  Without ``--enable-auto-tool-choice`` and a parser it is a 400, vLLM's.
- ``"required"`` and a named function force calls through the engine's grammar
  (:mod:`.tool_calls_schema`): an array of one or more calls, or the function's arguments.
- ``parallel_tool_calls: false`` keeps one call (the grammar allows only one with
  ``"required"``; with ``"auto"`` the calls after the first are dropped, as vLLM does).

Bounds: at most :data:`~.tool_calls_protocol.MAX_TOOLS` tools, :data:`MAX_TOOLS_BYTES` of
JSON in all (the specification bound of a grammar, since forced calls compile them into one),
parameter schemas :data:`~metroline.engine.structured_outputs.MAX_SCHEMA_DEPTH` levels deep,
describing objects, with local ``$ref`` only into their ``$defs`` / ``definitions``.
Errors about ``tools`` name ``tools`` as the param and the tool in the message.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..sampling_params import shorten
from ..structured_outputs import MAX_SCHEMA_DEPTH, MAX_SPEC_BYTES, schema_depth
from .errors import bad_request
from .tool_parsers import ToolParser, tool_parser
from .tool_parsers.base import FUNCTION_NAME, openai_call_id

if TYPE_CHECKING:
    from .args import ServerArgs
    from .protocol_chat import ChatCompletionRequest

#: Most bytes of all tools' JSON text (the forced-call grammar is built from it).
MAX_TOOLS_BYTES = MAX_SPEC_BYTES
_TOOL_KEYS = frozenset({"type", "function"})
_FUNCTION_KEYS = frozenset({"name", "description", "parameters", "strict"})
_AUTO_NEEDS_FLAGS = (
    '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
)

Mode = Literal["none", "auto", "required", "named"]


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tool fields ask for. ``tools`` are the request's (checked), as the
    chat template gets them; ``function`` is the named function; ``parser`` reads the
    output with ``"auto"``; ``new_id`` names the calls of the answer."""

    mode: Mode
    tools: tuple[dict[str, Any], ...]
    function: str | None = None
    parallel: bool = True
    parser: ToolParser | None = None
    new_id: Callable[[], str] = openai_call_id

    @property
    def forced(self) -> bool:
        """The engine's grammar makes the output a call."""
        return self.mode in ("required", "named")

    def parameters_of(self, name: str) -> dict[str, Any]:
        """The parameters schema of function ``name`` (an object without any)."""
        for tool in self.tools:
            function = tool["function"]
            if function["name"] == name:
                return function.get("parameters") or {"type": "object", "properties": {}}
        raise KeyError(name)


def plan_tools(body: ChatCompletionRequest, args: ServerArgs) -> ToolPlan | None:
    """The request's :class:`ToolPlan`, or None when it has no tools and no tool choice;
    400 naming the field at fault."""
    tools = check_tools(body.tools)
    choice = body.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    if not tools:
        if choice != "none":
            raise bad_request("When using `tool_choice`, `tools` must be set.", "tool_choice")
        return None
    configured = tool_parser(args.tool_call_parser) if args.tool_call_parser else None
    new_id = configured.new_id if configured is not None else openai_call_id
    if isinstance(choice, dict):
        name = _named_function(choice, tools)
        return ToolPlan("named", tools, name, body.parallel_tool_calls, new_id=new_id)
    if choice not in ("none", "auto", "required"):
        raise bad_request(
            f"tool_choice must be 'none', 'auto', 'required' or "
            f'{{"type": "function", "function": {{"name": ...}}}}; got {shorten(choice, 60)!r}',
            "tool_choice",
        )
    if choice == "auto" and not (args.enable_auto_tool_choice and configured is not None):
        raise bad_request(_AUTO_NEEDS_FLAGS, "tool_choice")
    parser = configured if choice == "auto" else None
    return ToolPlan(choice, tools, None, body.parallel_tool_calls, parser, new_id)


def _named_function(choice: dict[str, Any], tools: tuple[dict[str, Any], ...]) -> str:
    function = choice.get("function")
    if (
        set(choice) != {"type", "function"}
        or choice["type"] != "function"
        or not isinstance(function, dict)
        or set(function) != {"name"}
        or not isinstance(name := function["name"], str)
    ):
        raise bad_request(
            'a named tool_choice is {"type": "function", "function": {"name": NAME}} '
            "(nothing else)",
            "tool_choice",
        )
    if all(tool["function"]["name"] != name for tool in tools):
        raise bad_request(
            f"tool_choice names the function {shorten(name, 80)!r}, which is not in tools",
            "tool_choice",
        )
    return name


def check_tools(tools: list[dict[str, Any]] | None) -> tuple[dict[str, Any], ...]:
    """The request's tools, each ``{"type": "function", "function": {"name", "description",
    "parameters", "strict"}}`` with a unique name; 400 (param ``tools``) otherwise."""
    if tools is None:
        return ()
    if not tools:
        raise bad_request("tools must hold at least one tool (or be left out)", "tools")
    if _larger_than(tools, MAX_TOOLS_BYTES):  # before any walk of the tools: bounded work
        raise bad_request(f"tools hold more than {MAX_TOOLS_BYTES} bytes of JSON", "tools")
    names: set[str] = set()
    for index, tool in enumerate(tools):
        name = _check_tool(tool, f"tools.{index}")
        if name in names:
            raise bad_request(f"tools.{index}: a second function named {name!r}", "tools")
        names.add(name)
    try:
        size = len(json.dumps(tools, ensure_ascii=False, allow_nan=False).encode())
    except (ValueError, TypeError, RecursionError) as error:
        raise bad_request(f"tools cannot be written as JSON: {error}", "tools") from None
    if size > MAX_TOOLS_BYTES:
        raise bad_request(
            f"tools hold {size} bytes of JSON; at most {MAX_TOOLS_BYTES} are allowed", "tools"
        )
    return tuple(tools)


def _check_tool(tool: Any, where: str) -> str:
    """The function name of one tool; 400 naming ``where`` and what is wrong."""

    def fail(problem: str) -> Exception:
        return bad_request(f"{where}: {problem}", "tools")

    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise fail('a tool must be {"type": "function", "function": {...}}')
    unknown = sorted(set(tool) - _TOOL_KEYS)
    if unknown:
        raise fail(f"unknown field {shorten(unknown[0], 60)!r}")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise fail("function must be an object with at least a name")
    unknown = sorted(set(function) - _FUNCTION_KEYS)
    if unknown:
        raise fail(f"function has no field {shorten(unknown[0], 60)!r}")
    name = function.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
        raise fail(
            "function.name must be 1 to 64 letters, digits, underscores or dashes; got "
            f"{shorten(repr(name), 80)}"
        )
    if not isinstance(function.get("description", ""), (str, type(None))):
        raise fail("function.description must be a string")
    if not isinstance(function.get("strict", False), (bool, type(None))):
        raise fail("function.strict must be a boolean")
    parameters = function.get("parameters")
    if parameters is not None:
        if not isinstance(parameters, dict):
            raise fail("function.parameters must be a JSON schema object")
        if schema_depth(parameters) > MAX_SCHEMA_DEPTH:
            raise fail(f"function.parameters nests more than {MAX_SCHEMA_DEPTH} levels deep")
        if parameters.get("type", "object") != "object":
            raise fail("function.parameters must describe an object (arguments are one)")
        bad_ref = next(_local_refs_outside_defs(parameters), None)
        if bad_ref is not None:
            raise fail(
                f"function.parameters: $ref {shorten(bad_ref, 80)!r} is not supported; refer "
                "to #/$defs/NAME or #/definitions/NAME"
            )
    return name


def _larger_than(value: Any, limit: int) -> bool:
    """Whether ``value`` surely takes more than ``limit`` bytes as JSON: each node counts
    at most its JSON size, and the walk stops once past ``limit`` (work bounded by it)."""
    budget, stack = limit, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            budget -= 2 + 4 * len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            budget -= 2 + len(item)
            stack.extend(item)
        elif isinstance(item, str):
            budget -= 2 + len(item)
        else:
            budget -= 1
        if budget < 0:
            return True
    return False


def _local_refs_outside_defs(schema: Any):
    """``$ref`` values inside ``schema`` that point into it anywhere but its definitions
    (the forced-call schema embeds the parameters, so only those stay valid)."""
    stack = [schema]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            ref = item.get("$ref")
            if (
                isinstance(ref, str)
                and ref.startswith("#")
                and not ref.startswith(("#/$defs/", "#/definitions/"))
            ):
                yield ref
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def adjust_sampling(plan: ToolPlan | None, body: ChatCompletionRequest, params: Any) -> None:
    """Keep special tokens in the text when the parser's markers are special tokens (as
    vLLM's parsers do), unless the request set ``skip_special_tokens`` itself."""
    if (
        plan is not None
        and plan.parser is not None
        and plan.parser.needs_special_tokens
        and "skip_special_tokens" not in body.model_fields_set
    ):
        params.skip_special_tokens = False
