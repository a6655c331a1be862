"""From logits to tokens: penalties, temperature, top-k/top-p/min-p, per-request seeds.

Order (as in vLLM): ``allowed_token_ids``, bad words and min-tokens masking, ``logit_bias``,
penalties (repetition, frequency, presence), then greedy argmax for greedy rows; for the
others temperature, min-p, top-k, top-p and a draw.
A draw is ``argmax(probs / q)`` with ``q ~ Exp(1)`` per vocabulary entry (the exponential
race, equivalent to sampling from ``probs``); a seeded request draws ``q`` from its own
generator, so its tokens do not depend on what else is in the batch.
Log-probabilities are those of the raw model distribution, before any of these transforms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..outputs import Logprob, PositionLogprobs


@dataclass
class SamplingMetadata:
    """Sampling inputs of one step, one row per sampled request.

    Optional tensors are ``None`` when no row needs that transform, so the common cases
    (all greedy, plain temperature) cost nothing extra.
    """

    temperature: torch.Tensor  # [B] fp32; rows with greedy=True are ignored
    greedy: torch.Tensor  # [B] bool
    all_greedy: bool
    top_k: torch.Tensor | None  # [B] int64, vocab size where disabled
    top_p: torch.Tensor | None  # [B] fp32, 1.0 where disabled
    min_p: torch.Tensor | None  # [B] fp32, 0 where disabled
    presence_penalty: torch.Tensor | None  # [B] fp32
    frequency_penalty: torch.Tensor | None  # [B] fp32
    repetition_penalty: torch.Tensor | None  # [B] fp32
    output_token_counts: torch.Tensor | None  # [B, V] fp32 counts of generated tokens
    prompt_token_mask: torch.Tensor | None  # [B, V] bool: token occurs in the prompt
    generators: dict[int, torch.Generator]  # row -> the request's own generator
    max_num_logprobs: int | None  # largest ``logprobs`` asked for, None if no row asks
    #: True where ``allowed_token_ids`` bans a token ([B, V] bool; None if no row has any).
    allowed_token_mask: torch.Tensor | None = None
    #: Bad-word and min-tokens bans of every row, flat: rows [N] int64, token ids [N] int64.
    token_bans: tuple[torch.Tensor, torch.Tensor] | None = None
    #: ``logit_bias`` of every row, flat: rows [E] int64, token ids [E] int64, biases [E] fp32.
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


#: The token of a row whose every logit is -inf after the constraints (nothing may come
#: next): the scheduler fails that request.
NO_TOKEN = -1


@dataclass
class SamplerOutput:
    sampled: torch.Tensor  # [B] int64; NO_TOKEN where no token is allowed
    #: Per row: top log-probabilities plus the sampled token's (None where not asked).
    logprobs: list[PositionLogprobs | None]


def apply_token_constraints(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """``allowed_token_ids``, bad words and min-tokens bans (-inf), then ``logit_bias``
    (added). ``logits`` itself is never changed: a copy is returned when any applies. Every
    index is a device tensor already: nothing here copies from the host or synchronises."""
    if meta.allowed_token_mask is None and meta.token_bans is None and meta.logit_bias is None:
        return logits
    logits = logits.clone()
    if meta.allowed_token_mask is not None:
        logits.masked_fill_(meta.allowed_token_mask, float("-inf"))
    if meta.token_bans is not None:
        rows, token_ids = meta.token_bans
        logits[rows, token_ids] = float("-inf")  # a fill kernel: no host tensor
    if meta.logit_bias is not None:
        rows, token_ids, biases = meta.logit_bias
        logits.index_put_((rows, token_ids), biases, accumulate=True)
    return logits


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    if meta.repetition_penalty is not None:
        seen = meta.prompt_token_mask | (meta.output_token_counts > 0)
        penalty = meta.repetition_penalty[:, None]
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalised, logits)
    if meta.frequency_penalty is not None:
        logits = logits - meta.frequency_penalty[:, None] * meta.output_token_counts
    if meta.presence_penalty is not None:
        present = (meta.output_token_counts > 0).to(logits.dtype)
        logits = logits - meta.presence_penalty[:, None] * present
    return logits


def apply_top_k_top_p_min_p(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Mask (with -inf) tokens outside top-k, outside the top-p nucleus, or under min-p."""
    if meta.min_p is not None:
        probs = torch.softmax(logits, dim=-1)
        threshold = meta.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    if meta.top_k is None and meta.top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if meta.top_k is not None:
        ranks = torch.arange(logits.shape[-1], device=logits.device)
        sorted_logits = sorted_logits.masked_fill(
            ranks[None, :] >= meta.top_k[:, None], float("-inf")
        )
    if meta.top_p is not None:
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        sorted_logits = sorted_logits.masked_fill(mass_before >= meta.top_p[:, None], float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


@dataclass
class RowDistributions:
    """What the sampler decides from, per row: the argmax after constraints and penalties
    (what greedy rows take), rows left with no allowed token, the probabilities the other
    rows draw from (None when every row is greedy), and the raw log-probabilities (None
    when no row asks for log-probs)."""

    greedy_tokens: torch.Tensor  # [B] int64
    blocked: torch.Tensor  # [B] bool
    probs: torch.Tensor | None  # [B, V] fp32: after temperature, min-p, top-k, top-p
    raw_logprobs: torch.Tensor | None  # [B, V] fp32

    def rows(self, index: torch.Tensor) -> RowDistributions:
        """These rows only (``index``: row numbers on the device)."""
        probs, raw = self.probs, self.raw_logprobs
        return RowDistributions(
            self.greedy_tokens[index],
            self.blocked[index],
            None if probs is None else probs[index],
            None if raw is None else raw[index],
        )

    def draw(self, greedy: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
        """One token per row: the argmax for ``greedy`` rows, else the exponential race (a
        row's own generator where it has one); :data:`NO_TOKEN` where nothing is allowed."""
        sampled = self.greedy_tokens
        if self.probs is not None:
            race = torch.empty_like(self.probs).exponential_()
            for row, generator in generators.items():
                race[row].exponential_(generator=generator)
            drawn = (self.probs / race).argmax(dim=-1)
            sampled = torch.where(greedy, self.greedy_tokens, drawn)
        return sampled.masked_fill(self.blocked, NO_TOKEN)


class Sampler:
    def distributions(self, logits: torch.Tensor, meta: SamplingMetadata) -> RowDistributions:
        """``logits`` is ``[B, V]`` fp32; every transform of the module docstring, no draw."""
        raw_logprobs = (
            torch.log_softmax(logits, dim=-1) if meta.max_num_logprobs is not None else None
        )
        logits = apply_token_constraints(logits, meta)
        logits = apply_penalties(logits, meta)
        best, greedy_tokens = logits.max(dim=-1)
        probs = None
        if not meta.all_greedy:
            temperature = torch.where(meta.greedy, 1.0, meta.temperature)
            scaled = apply_top_k_top_p_min_p(logits / temperature[:, None], meta)
            probs = torch.softmax(scaled, dim=-1)
        return RowDistributions(greedy_tokens, torch.isneginf(best), probs, raw_logprobs)

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """``logits`` is ``[B, V]`` fp32; returns one token per row."""
        rows = self.distributions(logits, meta)
        sampled = rows.draw(meta.greedy, meta.generators)
        logprobs: list[PositionLogprobs | None] = [None] * logits.shape[0]
        if rows.raw_logprobs is not None:
            logprobs = gather_logprobs(rows.raw_logprobs, sampled, meta.max_num_logprobs or 0)
        return SamplerOutput(sampled=sampled, logprobs=logprobs)


def gather_logprobs(
    raw_logprobs: torch.Tensor, sampled: torch.Tensor, num_top: int
) -> list[PositionLogprobs | None]:
    """Sampled token's log-probability and rank, plus the ``num_top`` best, per row.

    Every row gets ``num_top`` alternatives; callers trim to what each request asked for.
    A row sampled as :data:`NO_TOKEN` (nothing allowed) gets ``None``.
    """
    sampled_lp = raw_logprobs.gather(-1, sampled.clamp(min=0)[:, None])
    ranks = (raw_logprobs > sampled_lp).sum(dim=-1) + 1
    top_values, top_ids = raw_logprobs.topk(num_top, dim=-1) if num_top else (None, None)
    rows: list[PositionLogprobs | None] = []
    sampled_list = sampled.tolist()
    sampled_lp_list = sampled_lp[:, 0].tolist()
    rank_list = ranks.tolist()
    top_values_list = top_values.tolist() if top_values is not None else None
    top_ids_list = top_ids.tolist() if top_ids is not None else None
    for row, token in enumerate(sampled_list):
        if token == NO_TOKEN:
            rows.append(None)
            continue
        entry: PositionLogprobs = {}
        if top_ids_list is not None:
            for rank, (tid, value) in enumerate(zip(top_ids_list[row], top_values_list[row])):
                entry[tid] = Logprob(value, rank + 1)
        entry[token] = Logprob(sampled_lp_list[row], rank_list[row])
        rows.append(entry)
    return rows
