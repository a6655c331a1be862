"""Attention over the paged KV cache: write this step's K/V, then attend."""

from __future__ import annotations

import torch
from torch import nn

from metroline.engine.attention_metadata import AttentionMetadata
from metroline.engine.layers import ops


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
