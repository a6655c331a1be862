"""The driver's sampling of a step in which some requests verify draft tokens.

Rows: a request with ``k`` drafts has ``k + 1`` logits rows (its next token's position, then
each draft's), the others one. Every row goes through the sampler's transforms
(:meth:`~metroline.engine.layers.sampler.Sampler.distributions`) with its request's
parameters; drafting requests never need per-position history (the scheduler keeps those
out: see ``core/speculation.py``), so one row's transforms hold for all of its rows.

- Requests without drafts draw exactly as :class:`~metroline.engine.layers.sampler.Sampler`
  does (the argmax, or the exponential race from their own generator).
- Greedy requests with drafts keep the longest prefix of drafts equal to the argmax, then the
  argmax after it: token for token what plain greedy decoding gives.
- Sampling requests with drafts (unseeded: seeded ones never draft) go through rejection
  sampling with a one-hot draft distribution (n-gram drafts are deterministic), drafts padded
  to the configured K.

A row left with no allowed token emits :data:`NO_TOKEN` there, and nothing after it.
Log-probs, when asked, are those of each emitted token at its own row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import faults
from ..layers.sampler import NO_TOKEN, RowDistributions, Sampler, gather_logprobs
from ..outputs import PositionLogprobs
from ..spec_decode.config import DRAFT_PAD_TOKEN
from ..spec_decode.rejection import rejection_sample, verify_greedy
from .host_staging import StepStaging
from .sampled_rows import wanted_entry, wanted_logprobs
from .step_inputs import WorkerRequestState, build_sampling_metadata

logger = logging.getLogger(__name__)


@dataclass
class DraftedSample:
    """Per sampled request (in order): its first emitted token; for those that verified
    drafts every emitted token; log-probs as asked."""

    tokens: list[int]
    spec_tokens: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, PositionLogprobs] = field(default_factory=dict)
    spec_logprobs: dict[str, list[PositionLogprobs]] = field(default_factory=dict)


def sample_drafted_batch(
    sampler: Sampler,
    logits: torch.Tensor,
    states: list[WorkerRequestState],
    drafts: list[list[int]],
    width: int,
    vocab_size: int,
    staging: StepStaging,
    failed: dict[str, str],
) -> DraftedSample:
    """:func:`sample_with_drafts` for the step; if the batch fails, each request alone (its
    generator rewound), and those that fail alone join ``failed`` (token 0, no drafts). If
    none fails alone, nothing explains the batch's error: it is raised."""
    generators = [s.generator for s in states if s.generator is not None]
    saved = [g.get_state() for g in generators]
    try:
        if faults.ACTIVE:
            for state in states:
                faults.inject("sampling", state.request_id)
        return sample_with_drafts(sampler, logits, states, drafts, width, vocab_size, staging)
    except Exception as error:
        if faults.poisons_engine(error):
            raise
        batch_error = error
    for generator, state in zip(generators, saved):
        generator.set_state(state)
    merged = DraftedSample([])
    newly_failed: dict[str, str] = {}
    start = 0
    for state, request_drafts in zip(states, drafts):
        rows = logits[start : start + len(request_drafts) + 1]
        start += len(request_drafts) + 1
        try:
            if faults.ACTIVE:
                faults.inject("sampling", state.request_id)
            one = sample_with_drafts(
                sampler, rows, [state], [request_drafts], width, vocab_size, staging
            )
        except Exception as error:
            if faults.poisons_engine(error):
                raise
            newly_failed[state.request_id] = f"sampling failed: {faults.describe(error)}"
            one = DraftedSample([0])
        merged.tokens += one.tokens
        merged.spec_tokens.update(one.spec_tokens)
        merged.logprobs.update(one.logprobs)
        merged.spec_logprobs.update(one.spec_logprobs)
    if not newly_failed:
        raise batch_error
    logger.error("sampling failed for %d request(s): %s", len(newly_failed), newly_failed)
    failed.update(newly_failed)
    return merged


def sample_with_drafts(
    sampler: Sampler,
    logits: torch.Tensor,
    states: list[WorkerRequestState],
    drafts: list[list[int]],
    width: int,
    vocab_size: int,
    staging: StepStaging,
) -> DraftedSample:
    """``logits`` ``[sum(len(d) + 1), V]`` fp32 in the row order of the module docstring;
    ``drafts[i]`` are ``states[i]``'s (``len <= width``, the configured K)."""
    counts = [len(d) + 1 for d in drafts]
    row_states = [state for state, count in zip(states, counts) for _ in range(count)]
    meta = build_sampling_metadata(row_states, vocab_size, staging)
    rows = sampler.distributions(logits, meta)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    device = logits.device
    tokens: list[int] = [NO_TOKEN] * len(states)
    emitted: dict[int, list[int]] = {}  # request index -> tokens, for those with drafts
    emitted_rows: dict[int, list[int]] = {}

    plain = [i for i, d in enumerate(drafts) if not d]
    if plain:
        at = torch.as_tensor(starts[plain], device=device)
        own = {r: states[i].generator for r, i in enumerate(plain)}
        own = {r: g for r, g in own.items() if g is not None}
        for i, token in zip(plain, rows.rows(at).draw(meta.greedy[at], own).tolist()):
            tokens[i] = token

    drafting = [i for i, d in enumerate(drafts) if d]
    if drafting:
        blocked = rows.blocked.tolist()
        verified = _verify(rows, states, drafts, drafting, starts, width, device)
        for i, row_tokens in zip(drafting, verified):
            positions = [int(starts[i]) + j for j in range(len(row_tokens))]
            for j, row in enumerate(positions):
                if blocked[row]:
                    row_tokens, positions = [*row_tokens[:j], NO_TOKEN], positions[: j + 1]
                    break
            emitted[i], emitted_rows[i] = row_tokens, positions
            tokens[i] = row_tokens[0]

    result = DraftedSample(
        tokens, {states[i].request_id: emitted[i] for i in drafting}
    )
    if rows.raw_logprobs is not None:
        _add_logprobs(result, rows.raw_logprobs, states, starts, plain, emitted, emitted_rows,
                      meta.max_num_logprobs or 0)  # fmt: skip
    return result


def _verify(
    rows: RowDistributions,
    states: list[WorkerRequestState],
    drafts: list[list[int]],
    drafting: list[int],
    starts: np.ndarray,
    width: int,
    device: torch.device,
) -> list[list[int]]:
    """Emitted tokens of each drafting request (greedy acceptance or rejection sampling)."""
    num_drafts = np.array([len(drafts[i]) for i in drafting], dtype=np.int64)
    positions = np.minimum(np.arange(width + 1)[None, :], num_drafts[:, None])
    index = torch.as_tensor(starts[drafting][:, None] + positions, device=device)
    padded = np.full((len(drafting), width), DRAFT_PAD_TOKEN, dtype=np.int64)
    for row, i in enumerate(drafting):
        padded[row, : len(drafts[i])] = drafts[i]
    draft_ids = torch.as_tensor(padded, device=device)
    counts = torch.as_tensor(num_drafts, device=device)
    out: list[list[int]] = [[] for _ in drafting]
    greedy = [states[i].sampling_params.greedy for i in drafting]
    picked = [r for r, g in enumerate(greedy) if g]
    if picked:
        sub = torch.as_tensor(picked, device=device)
        result = verify_greedy(rows.greedy_tokens[index[sub]], draft_ids[sub], counts[sub])
        for r, row_tokens in zip(picked, result.to_lists()):
            out[r] = row_tokens
    picked = [r for r, g in enumerate(greedy) if not g]
    if picked:
        sub = torch.as_tensor(picked, device=device)
        generators = [states[drafting[r]].generator for r in picked]
        result = rejection_sample(
            rows.probs[index[sub]], draft_ids[sub], None, counts[sub], generators
        )
        for r, row_tokens in zip(picked, result.to_lists()):
            out[r] = row_tokens
    return out


def _add_logprobs(
    result: DraftedSample,
    raw_logprobs: torch.Tensor,
    states: list[WorkerRequestState],
    starts: np.ndarray,
    plain: list[int],
    emitted: dict[int, list[int]],
    emitted_rows: dict[int, list[int]],
    num_top: int,
) -> None:
    device = raw_logprobs.device
    if plain:
        entries = gather_logprobs(
            raw_logprobs[torch.as_tensor(starts[plain], device=device)],
            torch.as_tensor([result.tokens[i] for i in plain], device=device),
            num_top,
        )
        result.logprobs = wanted_logprobs(
            [states[i] for i in plain], [result.tokens[i] for i in plain], entries
        )
    for i, row_tokens in emitted.items():
        if states[i].sampling_params.logprobs is None:
            continue
        entries = gather_logprobs(
            raw_logprobs[torch.as_tensor(emitted_rows[i], device=device)],
            torch.as_tensor(row_tokens, device=device),
            num_top,
        )
        asked = states[i].sampling_params.logprobs
        result.spec_logprobs[states[i].request_id] = [
            wanted_entry(entry, token, asked)
            for entry, token in zip(entries, row_tokens)
            if entry is not None
        ]
