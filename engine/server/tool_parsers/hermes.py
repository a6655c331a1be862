"""``hermes``: Hermes 2 Pro / 3, Qwen2.5 and Qwen3 write each call as a block

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Text outside the blocks is content (whitespace right before a block, and at the end, is
dropped); the last block may lack its closing tag when the output ends there.
"""

from __future__ import annotations

from typing import ClassVar

from .base import Program, ToolParser
from .reader import Reader

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    name: ClassVar[str] = "hermes"
    #: Hermes 2 Pro's tokenizer makes the tags special tokens.
    needs_special_tokens: ClassVar[bool] = True

    def program(self, reader: Reader) -> Program:
        while (yield from reader.content_until((START,))) is not None:
            reader.begin_call()
            reader.pos += len(START)
            yield from reader.skip_whitespace()
            yield from reader.call_object()
            yield from reader.skip_whitespace()
            yield from reader.expect(END, or_end=True)
