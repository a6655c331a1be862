"""Incremental detokenisation and stop-string matching.

Text grows by decoding a small window of recent tokens: the text of
``ids[prefix_offset:]`` minus that of ``ids[prefix_offset:read_offset]`` is new, unless it
ends in an incomplete UTF-8 sequence (U+FFFD), in which case we wait for more tokens. The
window starts inside the prompt so that tokenizers which drop a leading space at the start
of a decode (SentencePiece) still produce the right first word.
"""

from __future__ import annotations

from typing import Any

#: Prompt tokens kept as left context for the first decoded output token.
_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    """Invariant: ``text`` is the decoded output, cut before the first stop string found
    (after it, with ``include_stop_str``).

    The text is kept as pieces (joined when read, and cached), and stop strings are looked
    for in the new piece plus the tail before it that a stop string could start in, so the
    work per token does not grow with the length of the output.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        stop: tuple[str, ...] = (),
        skip_special_tokens: bool = True,
        include_stop_str: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.include_stop_str = include_stop_str
        self.skip_special_tokens = skip_special_tokens
        self.token_ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        #: Characters before a new piece in which a stop string may start.
        self._overlap = max((len(s) for s in stop), default=1) - 1
        self._pieces: list[str] = []
        self._length = 0
        self._joined: str | None = ""
        #: The last ``_overlap`` characters of the text.
        self._tail = ""
        #: How many tokens of the last :meth:`update` it took.
        self.num_taken = 0

    @property
    def text(self) -> str:
        if self._joined is None:
            self._joined = "".join(self._pieces)
            self._pieces = [self._joined]
        return self._joined

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def update(self, new_token_ids: list[int], check_stop: bool = True) -> str | None:
        """Append tokens; return the stop string that ended the text, if one did. Then
        :attr:`num_taken` says how many of ``new_token_ids`` it took, the one that completed
        the stop string included (a speculative step brings several; the rest are not the
        output's)."""
        self.num_taken = len(new_token_ids)
        for index, token_id in enumerate(new_token_ids):
            self.token_ids.append(token_id)
            prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
            full_text = self._decode(self.token_ids[self.prefix_offset :])
            if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
                self.prefix_offset = self.read_offset
                self.read_offset = len(self.token_ids)
                hit = self._append(full_text[len(prefix_text) :], check_stop and bool(self.stop))
                if hit is not None:
                    self.num_taken = index + 1
                    return hit
        return None

    def flush(self) -> None:
        """At the end: emit any text held back waiting for more bytes."""
        if self.read_offset < len(self.token_ids):
            prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
            full_text = self._decode(self.token_ids[self.prefix_offset :])
            if len(full_text) > len(prefix_text):
                self._append(full_text[len(prefix_text) :], check_stop=False)
            self.read_offset = len(self.token_ids)

    def _append(self, piece: str, check_stop: bool) -> str | None:
        """Add ``piece``; with ``check_stop``, cut the text before the earliest stop string
        that ends in it (it may start in the tail before; on a tie, the first listed), or
        after it with ``include_stop_str``, and return that stop string. Either cut is at
        or after the streamed length (the tail is held back while the text may grow)."""
        window = self._tail + piece
        window_start = self._length - len(self._tail)
        self._pieces.append(piece)
        self._length += len(piece)
        self._joined = None
        self._tail = window[-self._overlap :] if self._overlap else ""
        if not check_stop:
            return None
        best: tuple[int, str] | None = None
        for stop in self.stop:
            index = window.find(stop)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        cut = window_start + best[0] + (len(best[1]) if self.include_stop_str else 0)
        text = self.text[:cut]
        self._pieces, self._joined, self._length = [text], text, cut
        self._tail = text[-self._overlap :] if self._overlap else ""
        return best[1]

    def stream_safe_length(self, finished: bool) -> int:
        """How much of ``text`` can be streamed now: text that might still become the start
        of a stop string is held back until the request finishes."""
        if finished or not self.stop:
            return self._length
        return max(0, self._length - self._overlap)
