"""What the driver reads off a step's sampled rows: whether plain argmax is the whole
answer, and the log-probs each request asked for."""

from __future__ import annotations

from ..outputs import PositionLogprobs
from .step_inputs import WorkerRequestState


def plain_greedy(state: WorkerRequestState) -> bool:
    """Argmax of the raw logits is the whole answer: no penalties, bans, biases or
    log-probs."""
    params = state.sampling_params
    return (
        params.greedy
        and not params.uses_penalties
        and not params.restricts_tokens
        and params.logprobs is None
        and len(state.token_ids) - state.num_prompt_tokens >= params.min_tokens
    )


def wanted_logprobs(
    states: list[WorkerRequestState], tokens: list[int], entries: list[PositionLogprobs | None]
) -> dict[str, PositionLogprobs]:
    """Each request's sampled token plus the top ``logprobs`` it asked for."""
    wanted: dict[str, PositionLogprobs] = {}
    for state, token, entry in zip(states, tokens, entries):
        asked = state.sampling_params.logprobs
        if entry is not None and asked is not None:
            wanted[state.request_id] = wanted_entry(entry, token, asked)
    return wanted


def wanted_entry(entry: PositionLogprobs, token: int, asked: int) -> PositionLogprobs:
    """``entry`` trimmed to the ``token`` taken plus the top ``asked``."""
    return {tid: lp for tid, lp in entry.items() if tid == token or lp.rank <= asked}
