"""Tool-call parsers: a model's output text to content and tool calls, whole or streamed,
keyed by vLLM's ``--tool-call-parser`` names (see ``base`` for the contract and
``extractor`` for the streaming cost)."""

from __future__ import annotations

from .base import (
    MAX_TOOL_CALLS,
    ParsedOutput,
    StreamDelta,
    ToolCall,
    ToolCallDelta,
    ToolParser,
)
from .extractor import ToolCallExtractor
from .hermes import HermesToolParser
from .json_array import CallArrayParser
from .llama3_json import Llama3JsonToolParser
from .mistral import MistralToolParser

#: ``--tool-call-parser`` names (vLLM's) to parsers.
TOOL_PARSERS: dict[str, ToolParser] = {
    parser.name: parser
    for parser in (Llama3JsonToolParser(), HermesToolParser(), MistralToolParser())
}


def tool_parser(name: str) -> ToolParser:
    """The parser named ``name``; ``ValueError`` listing the names otherwise."""
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(
            f"no tool-call parser {name!r}; the parsers are {', '.join(TOOL_PARSERS)}"
        ) from None


__all__ = [
    "MAX_TOOL_CALLS",
    "TOOL_PARSERS",
    "CallArrayParser",
    "ParsedOutput",
    "StreamDelta",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallExtractor",
    "ToolParser",
    "tool_parser",
]
