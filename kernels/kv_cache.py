"""Write a step's new keys and values into the paged KV cache.

Cache layout (shared by every kernel in this package and by the engine):
``key_cache`` and ``value_cache`` are ``[num_blocks, block_size, num_kv_heads, head_dim]``,
contiguous. Token ``t`` of a request lives in physical block ``block_table[t // block_size]``
at row ``t % block_size``; its flat *slot* is ``block * block_size + row``.
A negative slot means "skip this token" (padding, CUDA-graph filler).
"""

from __future__ import annotations

import torch


def write_kv_cache_ref(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, negative = skip
) -> None:
    """Reference scatter: ``cache.view(-1, H, D)[slot] = kv`` for every slot >= 0."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
    flat_k = key_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    flat_v = value_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    flat_k[slots] = key[valid].to(key_cache.dtype)
    flat_v[slots] = value[valid].to(value_cache.dtype)
