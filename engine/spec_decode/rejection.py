"""Verification of draft tokens against the target model's K+1 positions per request.

Shapes (``R`` requests, ``K`` draft slots, ``V`` vocabulary): a request's ``num_drafts[i] <=
K`` drafts fill the front of its row of ``draft_token_ids [R, K]``, the rest is
:data:`DRAFT_PAD_TOKEN`; the target scored positions ``0..K`` (position ``j`` predicts the
token after the context plus drafts ``0..j-1``). Both functions return a :class:`Verified`:
``num_accepted [R]`` and ``token_ids [R, K+1]``, whose row ``i`` holds ``num_accepted[i] + 1``
tokens (the accepted drafts, then one token from the target: the correction at the first
rejection, or the bonus token after all drafts) and :data:`DRAFT_PAD_TOKEN` after them.

- :func:`verify_greedy`: a draft is accepted while it equals the target's argmax, so the
  output is token for token what plain greedy decoding gives.
- :func:`rejection_sample`: speculative sampling (Leviathan et al. 2023, Chen et al. 2023):
  draft ``x`` at position ``j`` is accepted with probability ``min(1, p_j(x) / q_j(x))``; the
  first rejection draws from ``norm(max(p_j - q_j, 0))``; when every draft is accepted the
  bonus is drawn from ``p_K_i``. Each emitted token is then distributed exactly as ``p``.

No host synchronisation: everything stays on the tensors' device until the caller reads the
result (one ``.tolist()``: :meth:`Verified.to_lists`). The only per-request Python work is
one loop over the seeded requests that draws their random numbers from their own generators
(one small kernel launch each, no sync), as the sampler does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .config import DRAFT_PAD_TOKEN


class Verified(NamedTuple):
    num_accepted: torch.Tensor  # [R] int64: accepted drafts; the row emits num_accepted + 1
    token_ids: torch.Tensor  # [R, K+1] int64: emitted tokens, DRAFT_PAD_TOKEN after them

    def to_lists(self) -> list[list[int]]:
        """Each request's emitted tokens (the one host synchronisation)."""
        counts = (self.num_accepted + 1).tolist()
        return [row[:count] for row, count in zip(self.token_ids.tolist(), counts)]


def verify_greedy(
    target_argmax: torch.Tensor, draft_token_ids: torch.Tensor, num_drafts: torch.Tensor
) -> Verified:
    """``target_argmax [R, K+1]``, ``draft_token_ids [R, K]``, ``num_drafts [R]`` (integer
    tensors on one device) -> the longest prefix of drafts equal to the argmax, then the
    argmax at the first mismatch (or at position ``num_drafts[i]``)."""
    _, width = _check_shapes(draft_token_ids, num_drafts, target_argmax.shape[:2])
    target_argmax = target_argmax.long()
    num_drafts = _clamped(num_drafts, width, target_argmax.device)
    accepted = _accepted_prefix(draft_token_ids == target_argmax[:, :width], num_drafts)
    # Accepted drafts equal the argmax at their positions, so every emitted token is the
    # target's argmax at its position: positions 0..accepted.
    return Verified(accepted, _emitted(target_argmax, accepted))


def rejection_sample(
    target_probs: torch.Tensor,
    draft_token_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    num_drafts: torch.Tensor,
    generators: Sequence[torch.Generator | None] | None = None,
) -> Verified:
    """Speculative sampling; see the module docstring.

    ``target_probs [R, K+1, V]`` and ``draft_probs [R, K, V]`` are probabilities (fp32,
    after temperature / top-k / top-p, rows summing to 1); ``draft_probs=None`` stands for a
    deterministic proposer (n-gram): ``q`` is one-hot on the draft, so a draft is accepted
    with probability ``p(x)`` and a rejection draws from ``p`` without ``x``.
    ``generators[i]`` (or None for the default generator) is request ``i``'s own. Every call
    draws, for each request in this fixed order, ``K`` uniforms then ``V`` exponentials
    from its generator, whatever the outcome: a seeded request's stream depends only on its
    own draws, not on the rest of the batch, as long as the caller pads drafts to the
    configured K.
    """
    if target_probs.dim() != 3:
        raise ValueError(f"target_probs must be [R, K+1, V]; got {tuple(target_probs.shape)}")
    num_reqs, width = _check_shapes(draft_token_ids, num_drafts, target_probs.shape[:2])
    vocab = target_probs.shape[2]
    if draft_probs is not None and tuple(draft_probs.shape) != (num_reqs, width, vocab):
        raise ValueError(
            f"draft_probs must be [R, K, V] = {(num_reqs, width, vocab)}; "
            f"got {tuple(draft_probs.shape)}"
        )
    if generators is not None and len(generators) != num_reqs:
        raise ValueError(
            f"need one generator (or None) per request: {num_reqs}, got {len(generators)}"
        )
    num_drafts = _clamped(num_drafts, width, target_probs.device)
    uniforms, race = _draws(num_reqs, width, vocab, target_probs.device, generators)
    drafts = draft_token_ids.long()
    safe_drafts = drafts.clamp(min=0)  # pads index token 0; they are masked below
    p_draft = target_probs[:, :width].gather(2, safe_drafts[:, :, None])[:, :, 0]
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)
    else:
        q_draft = draft_probs.gather(2, safe_drafts[:, :, None])[:, :, 0]
    # u < p / q, written so that q(x) = 0 (an impossible draft) cannot divide by zero.
    accepted = _accepted_prefix(uniforms * q_draft < p_draft, num_drafts)
    # The distribution of the one token the target adds: at position ``accepted``.
    rows = torch.arange(num_reqs, device=target_probs.device)
    p_next = target_probs[rows, accepted]  # [R, V]
    rejected = accepted < num_drafts
    if width:
        at = accepted.clamp(max=width - 1)
        if draft_probs is None:
            residual = p_next.scatter(1, safe_drafts[rows, at][:, None], 0.0)
        else:
            residual = (p_next - draft_probs[rows, at]).clamp(min=0.0)
        # A residual of zero mass (p == q up to rounding) cannot be normalised: use p.
        usable = rejected & (residual.sum(dim=1) > 0)
        p_next = torch.where(usable[:, None], residual, p_next)
    # Exponential race: argmax(w / E) with E ~ Exp(1) draws from norm(w).
    extra = (p_next / race).argmax(dim=1)
    return Verified(accepted, _emitted(drafts, accepted, extra))


def _check_shapes(
    draft_token_ids: torch.Tensor, num_drafts: torch.Tensor, target_shape: Sequence[int]
) -> tuple[int, int]:
    """``(R, K)``; ``target_shape`` is the target's ``(R, K+1)``. Values are not checked
    (that would synchronise)."""
    if draft_token_ids.dim() != 2:
        raise ValueError(f"draft_token_ids must be [R, K]; got {tuple(draft_token_ids.shape)}")
    num_reqs, width = draft_token_ids.shape
    if tuple(target_shape) != (num_reqs, width + 1):
        raise ValueError(
            f"the target must score K+1 = {width + 1} positions for each of {num_reqs} "
            f"requests; got {tuple(target_shape)}"
        )
    if tuple(num_drafts.shape) != (num_reqs,):
        raise ValueError(f"num_drafts must be [R] = [{num_reqs}]; got {tuple(num_drafts.shape)}")
    return num_reqs, width


def _clamped(num_drafts: torch.Tensor, width: int, device: torch.device) -> torch.Tensor:
    """``num_drafts`` on ``device`` as int64 in ``[0, K]`` (over K means K, under 0 means 0:
    checking instead would synchronise)."""
    return num_drafts.to(device=device, dtype=torch.long).clamp(0, width)


def _accepted_prefix(accept: torch.Tensor, num_drafts: torch.Tensor) -> torch.Tensor:
    """``[R, K]`` per-draft acceptance -> ``[R]`` length of the accepted prefix among each
    row's first ``num_drafts`` drafts."""
    positions = torch.arange(accept.shape[1], device=accept.device)
    valid = positions[None, :] < num_drafts[:, None]
    return (accept & valid).long().cumprod(dim=1).sum(dim=1)


def _emitted(
    tokens: torch.Tensor, accepted: torch.Tensor, extra: torch.Tensor | None = None
) -> torch.Tensor:
    """``[R, K+1]``: ``tokens`` at positions ``< accepted`` (all of ``0..accepted`` when
    ``extra`` is None), then ``extra`` at ``accepted``, pads after."""
    num_reqs = accepted.shape[0]
    width = (tokens.shape[1] - 1) if extra is None else tokens.shape[1]
    out = torch.full((num_reqs, width + 1), DRAFT_PAD_TOKEN, dtype=torch.long, device=tokens.device)
    positions = torch.arange(width + 1, device=tokens.device)[None, :]
    if extra is None:
        return torch.where(positions <= accepted[:, None], tokens, out)
    out[:, :width] = torch.where(positions[:, :width] < accepted[:, None], tokens, out[:, :width])
    return out.scatter(1, accepted[:, None], extra[:, None])


def _draws(
    num_reqs: int,
    width: int,
    vocab: int,
    device: torch.device,
    generators: Sequence[torch.Generator | None] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniforms ``[R, K]`` in [0, 1) and Exp(1) draws ``[R, V]`` (kept above 0, so the race
    never divides by zero); seeded rows redrawn from their own generator, uniforms first."""
    uniforms = torch.rand(num_reqs, width, device=device)
    race = torch.empty(num_reqs, vocab, device=device).exponential_()
    for row, generator in enumerate(generators or ()):
        if generator is not None:
            uniforms[row] = torch.rand(width, device=device, generator=generator)
            race[row].exponential_(generator=generator)
    return uniforms, race.clamp_(min=torch.finfo(race.dtype).tiny)
