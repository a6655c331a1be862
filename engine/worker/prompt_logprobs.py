"""Log-probabilities of prompt tokens (``prompt_logprobs``), from a step's hidden states.

The hidden state at prompt position ``p`` gives the distribution of token ``p + 1``, so a
prompt chunk covering positions ``[start, end)`` yields the entries of prompt tokens
``start + 1 .. min(end, P - 1)``; the first prompt token has none (nothing predicts it) and
the last position's distribution is the first output token's, which the sampler handles.
Logits are computed in pieces of at most ``max_rows`` rows (the sampler's profiled size), so
a long prompt chunk never holds ``chunk x vocabulary`` logits at once. Every tensor-parallel
rank runs the same pieces (the logits gather is collective); only the driver gets entries.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..layers.sampler import gather_logprobs
from ..messages import SchedulerOutput
from ..outputs import PositionLogprobs
from .step_inputs import WorkerRequestState


@dataclass(slots=True)
class PromptLogprobRows:
    """Rows ``row_start ..`` of a step's hidden states predict ``target_ids``, the prompt
    tokens from index ``first_token`` on."""

    request_id: str
    first_token: int
    row_start: int
    target_ids: list[int]
    num_top: int


def prompt_logprob_rows(
    scheduled: SchedulerOutput,
    states: dict[str, WorkerRequestState],
    request_ids: Iterable[str],
) -> list[PromptLogprobRows]:
    """The rows of this step (whose requests, in order, are ``request_ids``) that predict
    prompt tokens of requests that want their log-probs. A request whose prompt ends in this
    step stops wanting them."""
    rows = []
    row = 0
    for request_id in request_ids:
        count = scheduled.num_scheduled_tokens[request_id]
        state = states[request_id]
        if state.wants_prompt_logprobs:
            start = state.num_computed_tokens
            end = min(start + count, state.num_prompt_tokens - 1)
            if end > start:
                targets = state.token_ids[start + 1 : end + 1]
                num_top = state.sampling_params.prompt_logprobs or 0
                rows.append(PromptLogprobRows(request_id, start + 1, row, targets, num_top))
            if start + count >= state.num_prompt_tokens:
                state.wants_prompt_logprobs = False
        row += count
    return rows


def compute_prompt_logprobs(
    model: nn.Module, hidden: torch.Tensor, wanted: list[PromptLogprobRows], max_rows: int
) -> dict[str, tuple[int, list[PositionLogprobs]]]:
    """Request id -> (first prompt token index, its entries); empty on non-driver ranks."""
    results: dict[str, tuple[int, list[PositionLogprobs]]] = {}
    for item in wanted:
        entries: list[PositionLogprobs] = []
        for offset in range(0, len(item.target_ids), max_rows):
            targets = item.target_ids[offset : offset + max_rows]
            start = item.row_start + offset
            logits = model.compute_logits(hidden[start : start + len(targets)])
            if logits is None:  # a worker rank: the driver gathers the logits
                continue
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            target_ids = torch.tensor(targets, dtype=torch.int64, device=logprobs.device)
            entries.extend(gather_logprobs(logprobs, target_ids, item.num_top))
        if entries:
            results[item.request_id] = (item.first_token, entries)
    return results
