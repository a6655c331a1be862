"""``mistral``: Mistral's ``[TOOL_CALLS]`` followed by either a JSON array of calls (Mistral
7B v0.3, Nemo, Small 3.1)

    [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]

or, in the newer tokenizers' form (Small 3.2, Magistral, Devstral), one call per marker:

    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}

Text before (and between, and after) is content. ``[TOOL_CALLS]`` and ``[ARGS]`` are
control tokens, so the output must keep special tokens. Call ids are 9 letters and digits,
as Mistral's chat templates require.
"""

from __future__ import annotations

from typing import ClassVar

from .base import FUNCTION_NAME, MAX_FUNCTION_NAME, Program, ToolParser, mistral_call_id
from .reader import Malformed, Reader

TOOL_CALLS, ARGS = "[TOOL_CALLS]", "[ARGS]"


class MistralToolParser(ToolParser):
    name: ClassVar[str] = "mistral"
    needs_special_tokens: ClassVar[bool] = True
    new_id = staticmethod(mistral_call_id)

    def program(self, reader: Reader) -> Program:
        while (yield from reader.content_until((TOOL_CALLS,))) is not None:
            reader.begin_call()
            reader.pos += len(TOOL_CALLS)
            yield from reader.skip_whitespace()
            if (yield from reader.peek()) == "[":
                yield from reader.call_array()
                continue
            name = yield from _name_before_args(reader)
            yield from reader.skip_whitespace()
            yield from reader.call_arguments([], name)


def _name_before_args(reader: Reader) -> Program:
    """The function name up to ``[ARGS]`` (consumed)."""
    at = yield from reader.find(ARGS, MAX_FUNCTION_NAME)
    name = reader.text(reader.pos, at).strip()
    if not FUNCTION_NAME.fullmatch(name):
        raise Malformed("not a function name before [ARGS]")
    reader.pos = at + len(ARGS)
    return name
