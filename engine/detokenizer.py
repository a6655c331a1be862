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
    """Invariant: ``text`` is the decoded output, cut before the first stop string found."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        stop: tuple[str, ...] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.skip_special_tokens = skip_special_tokens
        self.token_ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def update(self, new_token_ids: list[int], check_stop: bool = True) -> str | None:
        """Append tokens; return the stop string that ended the text, if one did."""
        for token_id in new_token_ids:
            self.token_ids.append(token_id)
            prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
            full_text = self._decode(self.token_ids[self.prefix_offset :])
            if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
                before = len(self.text)
                self.text += full_text[len(prefix_text) :]
                self.prefix_offset = self.read_offset
                self.read_offset = len(self.token_ids)
                if check_stop and self.stop:
                    hit = self._find_stop(before)
                    if hit is not None:
                        return hit
        return None

    def flush(self) -> None:
        """At the end: emit any text held back waiting for more bytes."""
        if self.read_offset < len(self.token_ids):
            prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
            full_text = self._decode(self.token_ids[self.prefix_offset :])
            if len(full_text) > len(prefix_text):
                self.text += full_text[len(prefix_text) :]
            self.read_offset = len(self.token_ids)

    def _find_stop(self, new_text_start: int) -> str | None:
        """Earliest stop string that ends in the new text (it may start in older text)."""
        longest = max(len(s) for s in self.stop)
        search_from = max(0, new_text_start - longest + 1)
        best: tuple[int, str] | None = None
        for stop in self.stop:
            index = self.text.find(stop, search_from)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        self.text = self.text[: best[0]]
        return best[1]

    def stream_safe_length(self, finished: bool) -> int:
        """How much of ``text`` can be streamed now: text that might still become the start
        of a stop string is held back until the request finishes."""
        if finished or not self.stop:
            return len(self.text)
        return max(0, len(self.text) - (max(len(s) for s in self.stop) - 1))
