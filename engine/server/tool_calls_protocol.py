"""Tool-call shapes of ``/v1/chat/completions``: the calls an assistant message of the
history carries, and the calls an answer (or a streamed delta) carries, as OpenAI's API
has them. Lengths are bounded; the ``tools`` and ``tool_choice`` fields themselves are
checked by :mod:`.tool_calls`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_serializer

from .protocol import RequestModel
from .tool_parsers import MAX_TOOL_CALLS
from .tool_parsers.base import MAX_FUNCTION_NAME

#: Most tools one request may define (OpenAI's limit).
MAX_TOOLS = 128
#: Longest tool call id a message may give.
MAX_TOOL_CALL_ID = 256


class FunctionCallIn(RequestModel):
    name: str = Field(min_length=1, max_length=MAX_FUNCTION_NAME)
    arguments: str = Field(description="The arguments as JSON text of an object.")


class ToolCallIn(RequestModel):
    """A call an earlier assistant message made."""

    id: str = Field(min_length=1, max_length=MAX_TOOL_CALL_ID)
    type: Literal["function"] = "function"
    function: FunctionCallIn


#: An assistant message's calls.
ToolCallsIn = Annotated[list[ToolCallIn], Field(fail_fast=True, max_length=MAX_TOOL_CALLS)]
#: ``tools``: checked further by :func:`.tool_calls.check_tools`.
Tools = Annotated[list[dict[str, Any]], Field(max_length=MAX_TOOLS)]
#: ``tool_choice``: "none", "auto", "required" or {"type": "function", "function":
#: {"name": ...}}, checked by :func:`.tool_calls.plan_tools`.
ToolChoice = str | dict[str, Any]


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class _WithoutNulls(BaseModel):
    """Serialised without its unset (None) fields, as OpenAI's deltas are."""

    @model_serializer(mode="wrap")
    def _drop_nulls(self, handler: Any) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class DeltaFunctionCall(_WithoutNulls):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_WithoutNulls):
    """A piece of call ``index``: the first has ``id``, ``type`` and the name."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall
