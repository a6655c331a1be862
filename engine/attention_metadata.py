"""Per-step attention inputs built by the model runner and read by every attention layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """A flattened varlen batch over the paged KV cache.

    Request ``b`` owns query rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``; ``seq_lens[b]`` is its
    context length after this step; ``block_tables[b]`` lists its physical blocks;
    ``slot_mapping[t]`` is the cache slot of token ``t`` (negative: skip).
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32
    max_seqlen_q: int
    max_seqlen_k: int
