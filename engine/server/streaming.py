"""Cumulative engine outputs to per-choice deltas for server-sent events.

Invariant: for each choice, the concatenated deltas equal the final text and token list;
the finish reason is sent exactly once, in the choice's last delta.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..outputs import CompletionOutput, PositionLogprobs


@dataclass(slots=True)
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[PositionLogprobs] | None
    #: Offset of ``text`` in the choice's whole text.
    text_offset: int
    finish_reason: str | None
    stop_reason: int | str | None


@dataclass
class ChoiceCursor:
    """How much of one choice the client has been sent."""

    text_len: int = 0
    num_tokens: int = 0
    finished: bool = False

    def advance(self, output: CompletionOutput) -> Delta | None:
        """The new part of ``output`` (None if nothing new); marks what it returns as sent."""
        if self.finished:
            return None
        text = output.text[self.text_len :]
        token_ids = output.token_ids[self.num_tokens :]
        logprobs = None
        if output.logprobs is not None:
            logprobs = output.logprobs[self.num_tokens : self.num_tokens + len(token_ids)]
        if not text and not token_ids and not output.finished:
            return None
        delta = Delta(
            text=text,
            token_ids=token_ids,
            logprobs=logprobs,
            text_offset=self.text_len,
            finish_reason=output.finish_reason,
            stop_reason=output.stop_reason,
        )
        self.text_len = len(output.text)
        self.num_tokens = len(output.token_ids)
        self.finished = output.finished
        return delta


@dataclass
class StreamCursors:
    """Cursors for every choice of a response, keyed by choice index."""

    cursors: dict[int, ChoiceCursor] = field(default_factory=dict)

    def advance(self, index: int, output: CompletionOutput) -> Delta | None:
        return self.cursors.setdefault(index, ChoiceCursor()).advance(output)
