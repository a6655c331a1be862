"""The incremental detokeniser keeps its text in pieces and looks for stop strings only in
the new text plus the tail a stop string could start in: it must find exactly what a plain
search of the whole text finds (the straightforward version it replaced, kept here as the
reference), token by token, for any tokens and stop strings."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metroline.engine.client.detokenizer import IncrementalDetokenizer


class WholeTextDetokenizer:
    """The reference: the whole text kept as one string, searched from ``longest - 1``
    characters before each new piece; the earliest stop string wins, the first listed on a
    tie."""

    def __init__(self, tokenizer, prompt, stop):
        self.inner = IncrementalDetokenizer(tokenizer, prompt)  # decoding only, no stops
        self.stop = stop
        self.text = ""

    def update(self, token_ids, check_stop=True):
        for token_id in token_ids:
            before = len(self.inner.text)
            self.inner.update([token_id])
            self.text += self.inner.text[before:]
            if check_stop and self.stop and len(self.inner.text) > before:
                longest = max(len(s) for s in self.stop)
                start = max(0, before - longest + 1)
                hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) != -1]
                if hits:  # the earliest; on a tie, the first listed
                    index, stop = min(hits, key=lambda hit: hit[0])
                    self.text = self.text[:index]
                    return stop
        return None


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_checkpoint("llama")))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_pieces_and_tail_search_equal_the_whole_text_search(tokenizer, data):
    token_ids = data.draw(st.lists(st.integers(2, 511), min_size=1, max_size=60), label="tokens")
    text = tokenizer.decode(token_ids)
    # Stop strings taken from the text itself (so they hit), plus some that may not.
    pieces = st.builds(lambda a, n: text[a : a + n], st.integers(0, max(0, len(text) - 1)),
                       st.integers(1, 12))  # fmt: skip
    stop = tuple(s for s in data.draw(st.lists(pieces | st.text(min_size=1, max_size=4),
                                               max_size=4), label="stop") if s)  # fmt: skip
    check_from = data.draw(st.integers(0, len(token_ids)), label="min_tokens")
    ours = IncrementalDetokenizer(tokenizer, [5, 6, 7], stop)
    reference = WholeTextDetokenizer(tokenizer, [5, 6, 7], stop)
    for position, token_id in enumerate(token_ids):
        check = position + 1 >= check_from
        hit = ours.update([token_id], check_stop=check)
        assert hit == reference.update([token_id], check_stop=check)
        assert ours.text == reference.text
        assert ours.stream_safe_length(False) <= len(ours.text)
        if hit is not None:
            break
