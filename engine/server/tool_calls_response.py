"""Tool calls in answers: an output's text read as its :class:`~.tool_calls.ToolPlan`
says, whole (:func:`answer_of`) or streamed (:class:`ToolCallStream`, one per choice).

- named function: the text is the call's arguments; the finish reason stays the engine's
  (``"stop"``, as OpenAI and vLLM answer named calls);
- ``"required"``: the text is read as a JSON array of calls, ``"auto"``: with the server's
  parser. With calls, the content is the text before (and around) them, or null, and the
  finish reason ``"tool_calls"`` when the engine stopped the output itself (an output cut
  at ``max_tokens`` keeps ``"length"``); without (malformed, or the model answered in
  text), the text is the content;
- ``parallel_tool_calls: false``: calls after the first are dropped.

Streamed, the deltas of each choice concatenate to the same answer (see
``tool_parsers.extractor`` for what a stream of malformed output sends).
"""

from __future__ import annotations

from dataclasses import dataclass

from .tool_calls import ToolPlan
from .tool_calls_protocol import DeltaFunctionCall, DeltaToolCall, FunctionCallOut, ToolCallOut
from .tool_parsers import CallArrayParser, StreamDelta, ToolCallDelta, ToolParser

_CALL_ARRAY = CallArrayParser()


@dataclass(frozen=True, slots=True)
class Answer:
    content: str | None
    tool_calls: list[ToolCallOut]
    finish_reason: str | None


def _parser(plan: ToolPlan) -> ToolParser | None:
    return _CALL_ARRAY if plan.mode == "required" else plan.parser


def _finish_reason(plan: ToolPlan, has_calls: bool, finish_reason: str | None) -> str | None:
    if has_calls and plan.mode in ("auto", "required") and finish_reason == "stop":
        return "tool_calls"
    return finish_reason


def answer_of(plan: ToolPlan | None, text: str, finish_reason: str | None) -> Answer:
    """The message of one whole output."""
    if plan is None or plan.mode == "none":
        return Answer(text, [], finish_reason)
    if plan.mode == "named":
        call = ToolCallOut(
            id=plan.new_id(), function=FunctionCallOut(name=plan.function, arguments=text)
        )
        return Answer(None, [call], finish_reason)
    parsed = _parser(plan).parse(text, plan.new_id)
    calls = [
        ToolCallOut(id=call.id, function=FunctionCallOut(name=call.name, arguments=call.arguments))
        for call in parsed.tool_calls[: None if plan.parallel else 1]
    ]
    if not calls:
        return Answer(text, [], finish_reason)
    return Answer(parsed.content, calls, _finish_reason(plan, True, finish_reason))


class ToolCallStream:
    """One choice's stream: each text delta to content and tool-call deltas."""

    def __init__(self, plan: ToolPlan) -> None:
        self._plan = plan
        parser = _parser(plan)
        self._extractor = None if parser is None else parser.extractor(plan.new_id)
        self._named_id: str | None = None

    def step(
        self, text: str, finish_reason: str | None
    ) -> tuple[str, list[DeltaToolCall], str | None]:
        """Content, call deltas and finish reason for the next piece of text (the last
        piece has the engine's finish reason)."""
        if self._extractor is None:
            return "", self._named(text), finish_reason
        delta = self._extractor.feed(text)
        if finish_reason is not None:
            end = self._extractor.finish()
            delta = StreamDelta(delta.content + end.content, delta.tool_calls + end.tool_calls)
        calls = [
            _delta(piece) for piece in delta.tool_calls if self._plan.parallel or piece.index == 0
        ]
        has_calls = self._extractor.calls_sent > 0
        return delta.content, calls, _finish_reason(self._plan, has_calls, finish_reason)

    def _named(self, text: str) -> list[DeltaToolCall]:
        if self._named_id is None:
            self._named_id = self._plan.new_id()
            function = DeltaFunctionCall(name=self._plan.function, arguments=text)
            return [DeltaToolCall(index=0, id=self._named_id, type="function", function=function)]
        if not text:
            return []
        return [DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text))]


def _delta(piece: ToolCallDelta) -> DeltaToolCall:
    if piece.id is None:
        return DeltaToolCall(
            index=piece.index, function=DeltaFunctionCall(arguments=piece.arguments)
        )
    function = DeltaFunctionCall(name=piece.name, arguments=piece.arguments)
    return DeltaToolCall(index=piece.index, id=piece.id, type="function", function=function)


class ToolCallStreams:
    """The streams of a response's choices (text passes through without a plan, or with
    ``tool_choice: "none"``)."""

    def __init__(self, plan: ToolPlan | None) -> None:
        self._plan = plan if plan is not None and plan.mode != "none" else None
        self._streams: dict[int, ToolCallStream] = {}

    def step(
        self, index: int, text: str, finish_reason: str | None
    ) -> tuple[str, list[DeltaToolCall], str | None]:
        if self._plan is None:
            return text, [], finish_reason
        stream = self._streams.get(index)
        if stream is None:
            stream = self._streams[index] = ToolCallStream(self._plan)
        return stream.step(text, finish_reason)
