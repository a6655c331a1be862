"""Prompt lookup (n-gram) proposals: draft tokens copied from where the sequence's own tail
occurred before.

Matches vLLM's v1 n-gram proposer (``vllm/v1/spec_decode/ngram_proposer.py``,
``_find_longest_matched_ngram_and_propose_tokens``):

- the longest n in ``[min_n, max_n]`` whose last-n tokens occur earlier wins (tried from
  ``max_n`` down, so a longer match always beats a shorter one);
- among the occurrences of that n-gram, the **earliest** one is used;
- the trailing occurrence itself never counts, but an earlier one may overlap it (in
  ``[7, 7, 7]`` the 2-gram ``[7, 7]`` occurs at 0 and proposes ``[7]``);
- the proposal is the up-to-k tokens that followed the occurrence, running into the tail
  when fewer than k precede the end (``[1, 2, 3, 4, 2, 3]``, n=2 -> ``[4, 2, 3]``);
- a sequence shorter than ``min_n``, or no match, proposes nothing.

One difference, a bound vLLM does not have: only the last :data:`MAX_LOOKUP_TOKENS` tokens are
searched, so "earliest" means earliest inside that window, and one call costs at most
``MAX_LOOKUP_TOKENS * max_n`` comparisons however long the request grows. Capping k at the
room left before ``max_model_len`` (vLLM does it inside) is the caller's: pass a smaller k.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .config import DRAFT_PAD_TOKEN, MAX_NUM_SPECULATIVE_TOKENS, MAX_PROMPT_LOOKUP

#: Most trailing tokens of a request that one proposal searches.
MAX_LOOKUP_TOKENS = 16384

_EMPTY = np.empty(0, dtype=np.int64)


def propose_ngram(token_ids: np.ndarray, k: int, min_n: int, max_n: int) -> np.ndarray:
    """Up to ``k`` draft tokens (1-D int64, possibly empty) for the sequence ``token_ids``
    (1-D integers: prompt plus output so far), by the rules of the module docstring.

    Vectorised over positions: level ``d`` keeps the end positions of the earlier
    occurrences that also match the tail's ``d``-th token from the end, so the Python loop
    runs over at most ``max_n`` levels, never over positions.
    """
    _check_args(k, min_n, max_n)
    tokens = np.asarray(token_ids)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"token_ids must be a 1-D integer array; got {tokens.dtype}{tokens.shape}")
    window = tokens[-MAX_LOOKUP_TOKENS:]
    length = window.shape[0]
    if k == 0 or length < min_n or length < 2:
        return _EMPTY
    # End positions i < length - 1 of earlier occurrences of the last token.
    ends = np.flatnonzero(window[:-1] == window[-1])
    best_n, best_end = 0, -1
    for n in range(1, min(max_n, length) + 1):
        if n > 1:
            # Keep the occurrences whose n-th token from their end matches the tail's too.
            ends = ends[ends >= n - 1]
            ends = ends[window[ends - (n - 1)] == window[length - n]]
        if ends.size == 0:
            break
        best_n, best_end = n, int(ends[0])  # ``ends`` is sorted: [0] is the earliest
    if best_n < min_n:
        return _EMPTY
    return window[best_end + 1 : best_end + 1 + k].astype(np.int64)


def propose_ngram_batch(
    sequences: Sequence[np.ndarray],
    k: int | Sequence[int] | np.ndarray,
    min_n: int,
    max_n: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Proposals for many requests, in the shape verification takes.

    ``k`` is one bound for all, or one per request (a request near ``max_model_len`` gets
    fewer). Returns ``draft_token_ids`` ``[num_reqs, max k]`` int64 with
    :data:`DRAFT_PAD_TOKEN` after each row's drafts, and ``num_drafts`` ``[num_reqs]``
    int64. The width is the largest ``k`` asked for (not the longest proposal), so a caller
    that passes the configured K always gets ``[num_reqs, K]``.
    """
    num_reqs = len(sequences)
    ks = np.broadcast_to(np.asarray(k, dtype=np.int64), (num_reqs,))
    width = int(ks.max()) if num_reqs else (int(k) if np.ndim(k) == 0 else 0)
    drafts = np.full((num_reqs, width), DRAFT_PAD_TOKEN, dtype=np.int64)
    num_drafts = np.zeros(num_reqs, dtype=np.int64)
    for row, (tokens, row_k) in enumerate(zip(sequences, ks.tolist())):
        proposal = propose_ngram(tokens, row_k, min_n, max_n)
        drafts[row, : proposal.shape[0]] = proposal
        num_drafts[row] = proposal.shape[0]
    return drafts, num_drafts


def _check_args(k: int, min_n: int, max_n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer; got {k!r}")
    if not 0 <= k <= MAX_NUM_SPECULATIVE_TOKENS:
        raise ValueError(f"k={k} is out of range [0, {MAX_NUM_SPECULATIVE_TOKENS}]")
    if not 1 <= min_n <= max_n <= MAX_PROMPT_LOOKUP:
        raise ValueError(
            f"need 1 <= min_n <= max_n <= {MAX_PROMPT_LOOKUP}; got min_n={min_n}, max_n={max_n}"
        )
