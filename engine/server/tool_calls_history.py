"""Tool calls in a conversation's history: assistant messages with ``tool_calls`` (content
may be null) and ``tool`` messages answering them (``tool_call_id``), checked and shaped as
Hugging Face chat templates expect them (vLLM's way): each call's ``arguments`` as a dict,
not JSON text, so that templates can write them with ``tojson``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..chat_templates import ChatTemplateError
from .errors import bad_request

if TYPE_CHECKING:
    from .protocol_chat import ChatMessage
    from .tool_calls_protocol import ToolCallIn


def check_history(messages: Sequence[ChatMessage]) -> None:
    """400 for tool fields on the wrong role: ``tool_calls`` only on an assistant message,
    ``tool_call_id`` only on (and always on) a tool message."""
    for index, message in enumerate(messages):
        if message.tool_calls is not None and message.role != "assistant":
            raise bad_request(
                f"only an assistant message may have tool_calls, not a {message.role} one",
                f"messages.{index}.tool_calls",
            )
        if message.role == "tool" and message.tool_call_id is None:
            raise bad_request(
                "a tool message needs the tool_call_id of the call it answers",
                f"messages.{index}.tool_call_id",
            )
        if message.role != "tool" and message.tool_call_id is not None:
            raise bad_request(
                f"only a tool message may have a tool_call_id, not a {message.role} one",
                f"messages.{index}.tool_call_id",
            )


def template_tool_calls(calls: Sequence[ToolCallIn], index: int) -> list[dict[str, Any]]:
    """The calls of message ``index`` as a chat template sees them; ``ChatTemplateError``
    naming the call whose arguments are not the JSON text of an object."""
    shaped = []
    for number, call in enumerate(calls):
        try:
            arguments = json.loads(call.function.arguments)
        except (ValueError, RecursionError):
            arguments = None
        if not isinstance(arguments, dict):
            raise ChatTemplateError(
                "a tool call's arguments must be the JSON text of an object",
                f"messages.{index}.tool_calls.{number}.function.arguments",
            )
        shaped.append(
            {
                "id": call.id,
                "type": call.type,
                "function": {"name": call.function.name, "arguments": arguments},
            }
        )
    return shaped
