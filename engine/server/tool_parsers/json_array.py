"""The output of ``tool_choice: "required"``: a JSON array of one or more calls,

    [{"name": "get_weather", "parameters": {"city": "Paris"}}]

which the engine's grammar enforces (see ``tool_calls_schema``); whitespace around it is
allowed, anything else makes the output malformed before the first call, or content after
the array.
"""

from __future__ import annotations

from typing import ClassVar

from .base import Program, ToolParser
from .reader import Reader


class CallArrayParser(ToolParser):
    """Not a ``--tool-call-parser``: what a forced call's output is read with."""

    name: ClassVar[str] = "call_array"

    def program(self, reader: Reader) -> Program:
        yield from reader.skip_whitespace(as_content=True)
        reader.begin_call()
        yield from reader.call_array()
        yield from reader.content_until(())
