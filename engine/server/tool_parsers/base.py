"""What every tool-call parser shares: the calls it finds, the deltas it streams, and the
parser interface.

A parser reads one format (Llama 3 JSON, Hermes ``<tool_call>`` blocks, Mistral
``[TOOL_CALLS]``) from a model's output text. It has one implementation, the streaming one
(:class:`~.extractor.ToolCallExtractor`); :meth:`ToolParser.parse` feeds it the whole text at
once, so a stream's deltas always concatenate to what the whole text parses to, as long as
the output is well formed. Malformed output gives no tool calls and the whole text as
content (never an error); a stream cannot take back what it sent, see the extractor.
"""

from __future__ import annotations

import re
import secrets
import string
import uuid
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from .extractor import ToolCallExtractor
    from .reader import Reader

#: Most tool calls one output may hold; the next one makes the output malformed.
MAX_TOOL_CALLS = 128
#: Most characters of a call that may be read before its name is known (and of a format's
#: name or key strings): past that, the text is not a call. Bounds what a stream holds back.
MAX_HELD_CHARS = 4096
#: Longest function name or object key read from the output.
MAX_NAME_CHARS = 256
#: OpenAI's function names: letters, digits, underscores and dashes, at most 64.
MAX_FUNCTION_NAME = 64
FUNCTION_NAME = re.compile(rf"[a-zA-Z0-9_-]{{1,{MAX_FUNCTION_NAME}}}")
#: Keys a call object may give its arguments under (vLLM reads both).
ARGUMENTS_KEYS = ("arguments", "parameters")

#: A parser's program: a generator that reads the output through a Reader, yielding each time
#: it needs more text.
Program = Generator[None, None, None]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call: ``arguments`` is the JSON text of an object, as the model wrote it."""

    name: str
    arguments: str
    id: str


@dataclass(slots=True)
class ToolCallDelta:
    """A piece of call ``index`` in OpenAI's chunk shape: its first piece carries ``id`` and
    ``name``, the others only ``arguments`` text (which concatenates to the call's)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(slots=True)
class StreamDelta:
    """What one piece of output text adds: content text and call pieces."""

    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ParsedOutput:
    """A whole output: ``content`` is None when there is none (or only whitespace around
    the calls)."""

    content: str | None
    tool_calls: tuple[ToolCall, ...] = ()


def openai_call_id() -> str:
    """vLLM's id for a call: ``chatcmpl-tool-`` and 32 hex digits."""
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


_ALPHANUMERIC = string.ascii_letters + string.digits


def mistral_call_id() -> str:
    """Mistral's id for a call: 9 letters and digits (its chat template refuses others)."""
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(9))


class ToolParser:
    """One output format. Subclasses set ``name`` (vLLM's parser name) and write
    :meth:`program`; they hold no state (one instance serves every request)."""

    name: ClassVar[str]
    #: The format's markers are special tokens: the output text must keep special tokens.
    needs_special_tokens: ClassVar[bool] = False
    #: How this format's calls are named (Mistral's templates need their own ids).
    new_id: ClassVar[Callable[[], str]] = staticmethod(openai_call_id)

    def program(self, reader: Reader) -> Program:
        raise NotImplementedError

    def extractor(self, new_id: Callable[[], str] | None = None) -> ToolCallExtractor:
        """A fresh streaming extractor for one output."""
        from .extractor import ToolCallExtractor

        return ToolCallExtractor(self.program, new_id or self.new_id)

    def parse(self, text: str, new_id: Callable[[], str] | None = None) -> ParsedOutput:
        """The content and calls of a whole output; malformed: none, the text as content."""
        extractor = self.extractor(new_id)
        deltas = [extractor.feed(text), extractor.finish()]
        if extractor.failed:
            return ParsedOutput(content=text or None)
        return collect(deltas)


def collect(deltas: list[StreamDelta]) -> ParsedOutput:
    """The output that a stream of deltas adds up to."""
    content = "".join(delta.content for delta in deltas)
    names: dict[int, tuple[str, str]] = {}
    arguments: dict[int, list[str]] = {}
    for delta in deltas:
        for piece in delta.tool_calls:
            if piece.name is not None:
                names[piece.index] = (piece.name, piece.id or "")
            arguments.setdefault(piece.index, []).append(piece.arguments)
    calls = tuple(
        ToolCall(name=name, arguments="".join(arguments[index]), id=call_id)
        for index, (name, call_id) in sorted(names.items())
    )
    return ParsedOutput(content=content or None, tool_calls=calls)
