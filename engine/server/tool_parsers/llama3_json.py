"""``llama3_json``: Llama 3.1 / 3.2 (and 4) JSON tool calls,

    <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}

``<|python_tag|>`` is optional (a special token, usually left out of the text); several
calls are separated by ``;`` (or whitespace). The calls are the output's start (after
whitespace), or follow ``<|python_tag|>`` anywhere (the text before it is content); text
after the last call is content.
"""

from __future__ import annotations

from typing import ClassVar

from .base import Program, ToolParser
from .reader import Reader

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name: ClassVar[str] = "llama3_json"

    def program(self, reader: Reader) -> Program:
        yield from reader.skip_whitespace(as_content=True)
        if (yield from reader.peek()) != "{":
            if (yield from reader.content_until((PYTHON_TAG,))) is None:
                return
            reader.begin_call()
            reader.pos += len(PYTHON_TAG)
            yield from reader.skip_whitespace()
        while True:
            yield from reader.call_object()
            yield from reader.skip_whitespace(as_content=True)
            if (yield from reader.peek()) == ";":
                reader.pos += 1
                yield from reader.skip_whitespace()
            if (yield from reader.peek()) != "{":
                break
        yield from reader.content_until(())
