"""Engine log-probabilities in OpenAI's two shapes (chat ``content`` list, legacy
completions columns), and prompt log-probabilities in vLLM's. A position holds the sampled
token and the top ``k`` alternatives (rank <= k); the engine may return more alternatives
than a request asked for."""

from __future__ import annotations

import re

from ..outputs import PositionLogprobs
from .protocol import PromptLogprob, PromptLogprobs
from .protocol_chat import TokenLogprob, TopLogprob
from .protocol_completions import CompletionLogprobs

#: JSON has no -inf; OpenAI clients expect a finite float.
_FLOOR = -9999.0


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, reversed: printable stand-in character -> byte."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_BYTE_DECODER = _byte_decoder()
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_bytes(tokenizer, token_id: int, text: str) -> list[int]:
    """The token's own bytes. A token that is part of a UTF-8 character decodes to U+FFFD;
    its bytes then come from the vocabulary entry (byte-level BPE, or ``<0xNN>`` pieces)."""
    if "\ufffd" not in text or tokenizer is None:
        return list(text.encode())
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str):
        if match := _BYTE_PIECE.match(piece):
            return [int(match.group(1), 16)]
        if piece and all(c in _BYTE_DECODER for c in piece):
            return [_BYTE_DECODER[c] for c in piece]
    return list(text.encode())


def _token_text(tokenizer, token_id: int, position: PositionLogprobs) -> str:
    entry = position.get(token_id)
    if entry is not None and entry.decoded_token is not None:
        return entry.decoded_token
    return tokenizer.decode([token_id]) if tokenizer is not None else f"token_id:{token_id}"


def _top(position: PositionLogprobs, k: int) -> list[tuple[int, float]]:
    ranked = sorted(position.items(), key=lambda item: item[1].rank)
    return [(tid, max(lp.logprob, _FLOOR)) for tid, lp in ranked if lp.rank <= k][:k]


def chat_logprobs(
    tokenizer, token_ids: list[int], positions: list[PositionLogprobs], k: int
) -> list[TokenLogprob]:
    content = []
    for token_id, position in zip(token_ids, positions):
        text = _token_text(tokenizer, token_id, position)
        top = [
            TopLogprob(
                token=(t := _token_text(tokenizer, tid, position)),
                logprob=lp,
                bytes=token_bytes(tokenizer, tid, t),
            )
            for tid, lp in _top(position, k)
        ]
        content.append(
            TokenLogprob(
                token=text,
                logprob=max(position[token_id].logprob, _FLOOR),
                bytes=token_bytes(tokenizer, token_id, text),
                top_logprobs=top,
            )
        )
    return content


def completion_logprobs(
    tokenizer,
    token_ids: list[int],
    positions: list[PositionLogprobs],
    k: int,
    text_offset: int = 0,
) -> CompletionLogprobs:
    result = CompletionLogprobs()
    offset = text_offset
    for token_id, position in zip(token_ids, positions):
        text = _token_text(tokenizer, token_id, position)
        result.tokens.append(text)
        result.token_logprobs.append(max(position[token_id].logprob, _FLOOR))
        result.top_logprobs.append(
            {_token_text(tokenizer, tid, position): lp for tid, lp in _top(position, k)}
        )
        result.text_offset.append(offset)
        offset += len(text)
    return result


def prompt_logprobs(tokenizer, positions: list[PositionLogprobs | None]) -> PromptLogprobs:
    """vLLM's ``prompt_logprobs``: per prompt token, a map from token id to its
    log-probability, rank and text (the prompt's token and its top alternatives); None
    for the first token, which nothing precedes."""
    return [
        None
        if position is None
        else {
            str(token_id): PromptLogprob(
                logprob=max(lp.logprob, _FLOOR),
                rank=lp.rank,
                decoded_token=_token_text(tokenizer, token_id, position),
            )
            for token_id, lp in position.items()
        }
        for position in positions
    ]
