"""A resumable reader over a model's output, for tool-call parser programs.

A program (a generator) reads through the reader's primitives, which are generators too:
``yield from reader.peek()`` waits, by yielding to the extractor, until the next character
has arrived or the output has ended. What the program finds goes into ``events``: content
text, and call deltas (:class:`~.base.ToolCallDelta`).

Invariants: each character is scanned once (a marker's possible prefix at the end of the
text, shorter than the marker, is looked at again when more text comes); only the text
from the earliest position still needed is kept (``_buf`` starts at absolute offset
``_base``): the scan position, the start of a call not yet confirmed (``hold``, at most
:data:`~.base.MAX_HELD_CHARS` back) or of a string being read (at most
:data:`~.base.MAX_NAME_CHARS`). Content right before a call, and at the end once a call was
sent, loses its trailing whitespace. Anything that does not match the format raises
:class:`Malformed`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Generator
from typing import Any

from .base import (
    ARGUMENTS_KEYS,
    MAX_HELD_CHARS,
    MAX_NAME_CHARS,
    MAX_TOOL_CALLS,
    ToolCallDelta,
)

#: Most levels of arrays and objects in a call's arguments.
MAX_JSON_DEPTH = 128

_WHITESPACE = re.compile(r"\s*")
_IN_STRING = re.compile(r'["\\]')
_STRUCTURE = re.compile(r'[{}\[\]"]')
_SCALAR_END = re.compile(r"[\s,}\]]")
_CLOSERS = {"}": "{", "]": "["}

Wait = Generator[None, None, Any]


class Malformed(Exception):
    """The output stops matching the format here."""


class Reader:
    def __init__(self, new_id: Callable[[], str], max_calls: int = MAX_TOOL_CALLS) -> None:
        self._new_id = new_id
        self._max_calls = max_calls
        self._buf = ""
        self._base = 0
        #: Absolute offset of the next character to read.
        self.pos = 0
        self.ended = False
        #: Absolute start of the call being read while none of it has been sent.
        self.hold: int | None = None
        self._string_start: int | None = None
        #: Absolute start of the arguments text not yet given to their sink.
        self.unsent: int | None = None
        self.events: list[str | ToolCallDelta] = []
        #: Whitespace that ended the content so far: sent only if content follows.
        self.pending_whitespace: list[str] = []
        self.calls_sent = 0

    # The text -----------------------------------------------------------------------------

    @property
    def end(self) -> int:
        return self._base + len(self._buf)

    def text(self, start: int, stop: int) -> str:
        return self._buf[start - self._base : stop - self._base]

    def append(self, piece: str) -> None:
        """Add output text, dropping what no reader position needs any more."""
        needed = (self.pos, self.hold, self._string_start, self.unsent)
        keep = min(p for p in needed if p is not None)
        if keep > self._base:
            self._buf = self._buf[keep - self._base :]
            self._base = keep
        self._buf += piece

    def _more(self) -> Wait:
        """Wait for more text; False once the output has ended."""
        self._check_held()
        if self.ended:
            return False
        yield
        return True

    def _check_held(self) -> None:
        if self.hold is not None and self.pos - self.hold > MAX_HELD_CHARS:
            raise Malformed(f"no call name within {MAX_HELD_CHARS} characters")

    def peek(self) -> Wait:
        """The next character (not consumed), or None at the end of the output."""
        while self.pos >= self.end:
            if not (yield from self._more()):
                return None
        return self._buf[self.pos - self._base]

    def skip_whitespace(self, as_content: bool = False) -> Wait:
        while True:
            match = _WHITESPACE.match(self._buf, self.pos - self._base)
            if as_content:
                self.content(match.group())
            self.pos = self._base + match.end()
            if self.pos < self.end or not (yield from self._more()):
                return

    def expect(self, literal: str, or_end: bool = False) -> Wait:
        """Consume ``literal`` (or, with ``or_end``, the end of the output)."""
        while self.end - self.pos < len(literal):
            if not literal.startswith(self.text(self.pos, self.end)):
                raise Malformed(f"expected {literal!r}")
            if not (yield from self._more()):
                if or_end and self.pos == self.end:
                    return
                raise Malformed(f"expected {literal!r}")
        if self.text(self.pos, self.pos + len(literal)) != literal:
            raise Malformed(f"expected {literal!r}")
        self.pos += len(literal)

    # Content ------------------------------------------------------------------------------

    def content(self, text: str) -> None:
        """Content text; its trailing whitespace waits for what follows."""
        if not text:
            return
        stripped = text.rstrip()
        if stripped:
            self._event("".join(self.pending_whitespace) + stripped)
            self.pending_whitespace = []
        if len(stripped) < len(text):
            self.pending_whitespace.append(text[len(stripped) :])

    def end_content(self, keep_whitespace: bool) -> None:
        """The output ended: its trailing whitespace is content unless calls were sent."""
        if keep_whitespace and self.pending_whitespace:
            self._event("".join(self.pending_whitespace))
        self.pending_whitespace = []

    def restart(self) -> None:
        """After :class:`Malformed`: read on from the start of the held call, else from the
        first character not yet sent (so that no text is lost)."""
        for start in (self.hold, self.unsent, self.pos):
            if start is not None:
                self.pos = start
                break
        self.hold = self._string_start = self.unsent = None

    def content_until(self, markers: tuple[str, ...]) -> Wait:
        """Content up to the first of ``markers`` (left unconsumed: ``pos`` is at it); the
        marker, or None at the end of the output (all the rest was content)."""
        while True:
            start = self.pos - self._base
            found = [(at, m) for m in markers if (at := self._buf.find(m, start)) >= 0]
            if found:
                at, marker = min(found)
                self.content(self._buf[start:at])
                self.pos = self._base + at
                return marker
            keep = _partial_marker(self._buf, start, markers)
            self.content(self._buf[start : len(self._buf) - keep])
            self.pos = self.end - keep
            if not (yield from self._more()):
                self.content(self.text(self.pos, self.end))
                self.pos = self.end
                return None

    # Calls --------------------------------------------------------------------------------

    def begin_call(self) -> None:
        """A call may start here: hold its text until its name is known."""
        if self.calls_sent >= self._max_calls:
            raise Malformed(f"more than {self._max_calls} tool calls")
        if self.hold is None:
            self.hold = self.pos

    def confirm(self, name: str) -> None:
        """Send the call's first delta (a new id and its name)."""
        self._check_held()
        self.events.append(ToolCallDelta(self.calls_sent, self._new_id(), name, ""))
        self.calls_sent += 1
        self.hold = None
        self.pending_whitespace = []

    def arguments(self, piece: str) -> None:
        if piece:
            self._event(ToolCallDelta(self.calls_sent - 1, arguments=piece))

    def _event(self, event: str | ToolCallDelta) -> None:
        """Append, merging with the previous event of the same kind (and call)."""
        last = self.events[-1] if self.events else None
        if isinstance(event, str) and isinstance(last, str):
            self.events[-1] = last + event
        elif (
            isinstance(event, ToolCallDelta)
            and isinstance(last, ToolCallDelta)
            and last.index == event.index
        ):
            last.arguments += event.arguments
        else:
            self.events.append(event)

    def call_object(self) -> Wait:
        """One ``{"name": ..., "arguments"|"parameters": {...}}`` object (other keys are
        skipped); its deltas are sent from the moment both the name and the start of the
        arguments are known."""
        self.begin_call()
        yield from self.expect("{")
        yield from self.skip_whitespace()
        name: str | None = None
        parts: list[str] | None = None
        while True:
            key = yield from self.string()
            yield from self.skip_whitespace()
            yield from self.expect(":")
            yield from self.skip_whitespace()
            if key == "name" and name is None:
                name = yield from self.string()
                if not name:
                    raise Malformed("an empty function name")
                if parts is not None:  # the arguments came first
                    self.confirm(name)
                    self.arguments("".join(parts))
            elif key in ARGUMENTS_KEYS and parts is None:
                parts = []
                yield from self.call_arguments(parts, name)
            elif key == "name" or key in ARGUMENTS_KEYS:
                raise Malformed(f"{key!r} twice in a call")
            else:
                yield from self.json_value(None)
            yield from self.skip_whitespace()
            separator = yield from self.peek()
            if separator not in (",", "}"):
                raise Malformed("expected ',' or '}' in a call")
            self.pos += 1
            if separator == "}":
                break
            yield from self.skip_whitespace()
        if name is None or parts is None:
            raise Malformed("a call needs a name and arguments")

    def call_array(self) -> Wait:
        """``[call, call, ...]``: one or more call objects."""
        yield from self.expect("[")
        yield from self.skip_whitespace()
        while True:
            yield from self.call_object()
            yield from self.skip_whitespace()
            separator = yield from self.peek()
            if separator not in (",", "]"):
                raise Malformed("expected ',' or ']' after a call")
            self.pos += 1
            if separator == "]":
                return
            yield from self.skip_whitespace()

    def call_arguments(self, parts: list[str], name: str | None) -> Wait:
        """A JSON object, the call's arguments: kept in ``parts``; once it has begun, the
        call named ``name`` is confirmed and the arguments sent as they arrive (without a
        name yet, they are only kept). Checked as JSON once complete."""
        if (yield from self.peek()) != "{":
            raise Malformed("arguments that are not a JSON object")
        if name is not None:
            self.confirm(name)

        def sink(piece: str) -> None:
            parts.append(piece)
            if name is not None:
                self.arguments(piece)

        yield from self.json_value(sink, object_only=True)
        try:
            value = json.loads("".join(parts))
        except (ValueError, RecursionError):
            raise Malformed("arguments that are not JSON") from None
        if not isinstance(value, dict):
            raise Malformed("arguments that are not a JSON object")

    def find(self, marker: str, within: int) -> Wait:
        """The absolute position of ``marker`` (not consumed), which must start within
        ``within`` characters of the scan position."""
        start = self.pos
        while True:
            at = self._buf.find(marker, start - self._base)
            if 0 <= at <= start - self._base + within:
                return self._base + at
            if self.end - start > within + len(marker) or not (yield from self._more()):
                raise Malformed(f"no {marker!r} within {within} characters")

    # JSON ---------------------------------------------------------------------------------

    def string(self, max_chars: int = MAX_NAME_CHARS) -> Wait:
        """A JSON string of at most ``max_chars`` characters, decoded."""
        if (yield from self.peek()) != '"':
            raise Malformed("expected a string")
        start = self._string_start = self.pos
        self.pos += 1
        while True:
            match = _IN_STRING.search(self._buf, self.pos - self._base)
            if match is not None and match.group() == '"':
                self.pos = self._base + match.end()
                break
            if match is not None and match.end() < len(self._buf):
                self.pos = self._base + match.end() + 1  # an escape and its character
            else:
                self.pos = self._base + (match.start() if match else len(self._buf))
                if self.pos - start > max_chars or not (yield from self._more()):
                    raise Malformed("an unfinished or too long string")
        self._string_start = None
        if self.pos - start > max_chars + 2:
            raise Malformed("a string that is too long")
        try:
            return json.loads(self.text(start, self.pos))
        except ValueError:
            raise Malformed("an invalid string") from None

    def json_value(self, sink: Callable[[str], None] | None, object_only: bool = False) -> Wait:
        """One JSON value, its text given to ``sink`` piece by piece as it arrives. Checks
        brackets and strings only (callers that keep the value parse it)."""
        first = yield from self.peek()
        if first is None or (object_only and first != "{"):
            raise Malformed("expected a JSON object" if object_only else "expected a value")
        self.unsent = self.pos

        def flush() -> None:
            if sink is not None and self.pos > self.unsent:
                sink(self.text(self.unsent, self.pos))
            self.unsent = self.pos

        if first not in '{["':
            while (match := _SCALAR_END.search(self._buf, self.pos - self._base)) is None:
                self.pos = self.end
                flush()
                if not (yield from self._more()):
                    self.unsent = None
                    return
            self.pos = self._base + match.start()
            flush()
            self.unsent = None
            return
        stack: list[str] = []
        in_string = False
        while True:
            pattern = _IN_STRING if in_string else _STRUCTURE
            match = pattern.search(self._buf, self.pos - self._base)
            if match is None or (match.group() == "\\" and match.end() == len(self._buf)):
                self.pos = self._base + (match.start() if match else len(self._buf))
                flush()
                if not (yield from self._more()):
                    raise Malformed("an unfinished JSON value")
                continue
            char = match.group()
            self.pos = self._base + match.end()
            if char == "\\":
                self.pos += 1
            elif char == '"':
                in_string = not in_string
            elif char in "{[":
                stack.append(char)
                if len(stack) > MAX_JSON_DEPTH:
                    raise Malformed("JSON nested too deeply")
            elif not stack or stack.pop() != _CLOSERS[char]:
                raise Malformed("unbalanced brackets")
            if not stack and not in_string:
                flush()
                self.unsent = None
                return


def _partial_marker(buf: str, start: int, markers: tuple[str, ...]) -> int:
    """Length of the longest tail of ``buf[start:]`` that begins one of ``markers``."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(buf) - start), longest, -1):
            if buf.endswith(marker[:size]):
                longest = size
                break
    return longest
