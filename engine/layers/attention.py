"""Attention over the paged KV cache: write this step's K/V, then attend.

:class:`AttentionMetadata` is built once per step by the model runner and passed explicitly
to every attention layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import ops


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


class Attention(nn.Module):
    """Holds one layer's slice of the KV pool (bound by the worker after allocation).

    With ``attn_metadata=None`` (the memory-profiling pass, before the pool exists) it
    returns zeros of the output's shape and touches no cache.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.key_cache: torch.Tensor | None = None
        self.value_cache: torch.Tensor | None = None

    def bind_kv_cache(self, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
        self.key_cache, self.value_cache = key_cache, value_cache

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        attn_metadata: AttentionMetadata | None,
    ) -> torch.Tensor:
        if attn_metadata is None or self.key_cache is None or self.value_cache is None:
            return torch.zeros_like(query)
        ops.write_kv_cache(key, value, self.key_cache, self.value_cache, attn_metadata.slot_mapping)
        return ops.paged_attention(
            query,
            self.key_cache,
            self.value_cache,
            attn_metadata.block_tables,
            attn_metadata.seq_lens,
            attn_metadata.cu_seqlens_q,
            self.scale,
            attn_metadata.max_seqlen_q,
            attn_metadata.max_seqlen_k,
        )
