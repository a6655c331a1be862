"""The streaming tool-call extractor: fed an output's text deltas, it answers each with
content and call deltas (:class:`~.base.StreamDelta`).

Cost: each character is scanned once by the parser's program; each delta also copies the
text still held back (a possible marker's prefix, or a call not yet confirmed, at most
:data:`~.base.MAX_HELD_CHARS` characters), and a call's arguments are parsed as JSON once,
when complete. So a stream of ``n`` characters in ``d`` deltas costs ``O(n + d * 4096)``
at worst, never a rescan of the whole text.

A call is sent from the moment its name and the start of its arguments are known; until
then its text is held back. When the output turns out malformed before anything of a call
was sent, the held text and all the rest go out as content, so that the stream adds up to
what :meth:`~.base.ToolParser.parse` gives (the whole text as content). A stream cannot take
back what it sent: when the output breaks off or turns malformed after a call was sent, the
deltas sent stand (the non-streaming answer then has no calls), and the text not yet sent
goes out as content.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import MAX_TOOL_CALLS, Program, StreamDelta, ToolCallDelta
from .reader import Malformed, Reader


class ToolCallExtractor:
    """One output's extractor. ``failed`` is true once the output did not match the
    format (the rest is then content)."""

    def __init__(
        self,
        program: Callable[[Reader], Program],
        new_id: Callable[[], str],
        max_calls: int = MAX_TOOL_CALLS,
    ) -> None:
        self._reader = Reader(new_id, max_calls)
        self._program: Program | None = program(self._reader)
        self.failed = False

    @property
    def calls_sent(self) -> int:
        return self._reader.calls_sent

    def feed(self, text: str) -> StreamDelta:
        """The deltas ``text`` (the next piece of output) completes."""
        if text:
            self._reader.append(text)
            self._run()
        return self._take()

    def finish(self) -> StreamDelta:
        """The deltas of the end of the output: what was held back is resolved."""
        reader = self._reader
        if not reader.ended:
            reader.ended = True
            self._run()
            reader.end_content(keep_whitespace=reader.calls_sent == 0)
        return self._take()

    def _run(self) -> None:
        while self._program is not None:
            try:
                next(self._program)
                return
            except StopIteration:
                self._program = None
            except Malformed:
                self._fail()

    def _fail(self) -> None:
        """The rest of the output, from the call that broke (or from where it broke, if
        some of it was sent), is content."""
        reader = self._reader
        self.failed = True
        reader.restart()
        self._program = _all_content(reader)

    def _take(self) -> StreamDelta:
        delta = StreamDelta()
        for event in self._reader.events:
            if isinstance(event, ToolCallDelta):
                delta.tool_calls.append(event)
            else:
                delta.content += event
        self._reader.events = []
        return delta


def _all_content(reader: Reader) -> Program:
    yield from reader.content_until(())
