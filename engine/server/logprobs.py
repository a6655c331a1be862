"""Engine log-probabilities in OpenAI's two shapes (chat ``content`` list, legacy
completions columns). A position holds the sampled token and the top ``k`` alternatives
(rank <= k); the engine may return more alternatives than a request asked for."""

from __future__ import annotations

from metroline.engine.outputs import PositionLogprobs
from metroline.engine.server.protocol_chat import TokenLogprob, TopLogprob
from metroline.engine.server.protocol_completions import CompletionLogprobs

#: JSON has no -inf; OpenAI clients expect a finite float.
_FLOOR = -9999.0


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
                bytes=list(t.encode()),
            )
            for tid, lp in _top(position, k)
        ]
        content.append(
            TokenLogprob(
                token=text,
                logprob=max(position[token_id].logprob, _FLOOR),
                bytes=list(text.encode()),
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
