"""Grammar bitmasks applied to logits before sampling.

A bitmask row holds ``ceil(vocab / 32)`` int32 words; bit ``t % 32`` of word ``t // 32``
set means token ``t`` may come next (xgrammar's layout); a row of all ones leaves its logits
as they are. Invariant: after :func:`apply_token_bitmask`, every token a row's mask forbids
has logit ``-inf`` and every other logit is unchanged.
"""

from __future__ import annotations

import torch

#: Rows unpacked at once: the unpacked mask takes one byte per token of each row.
ROWS_PER_CHUNK = 256


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Mask ``logits`` (``[rows, vocab]``, in place) with ``bitmask`` (``[rows, words]``
    int32, row for row). ``bitmask`` may be on the host: pinned on CUDA, the copy does
    not block the host."""
    device = logits.device
    words = bitmask.to(device, non_blocking=True)
    rows, vocab = logits.shape
    shifts = torch.arange(8, dtype=torch.uint8, device=device)
    for start in range(0, rows, ROWS_PER_CHUNK):
        end = min(rows, start + ROWS_PER_CHUNK)
        # Little-endian bytes of each word keep the tokens in order: byte j of word w holds
        # tokens 32w + 8j .. 32w + 8j + 7, lowest bit first.
        packed = words[start:end].contiguous().view(torch.uint8)
        allowed = ((packed.unsqueeze(-1) >> shifts) & 1).view(end - start, -1)[:, :vocab]
        logits[start:end].masked_fill_(allowed == 0, float("-inf"))
