"""Attention over the paged KV cache: write this step's K/V, then attend.

:class:`AttentionMetadata` is built once per step by the model runner and passed explicitly
to every attention layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import ops
from .weights import new_parameter, read_all, source_shape


@dataclass(slots=True)
class AttentionMetadata:
    """A flattened varlen batch over the paged KV cache.

    Request ``b`` owns query rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``; ``seq_lens[b]`` is its
    context length after this step; ``block_tables[b]`` lists its physical blocks;
    ``slot_mapping[t]`` is the cache slot of token ``t`` (negative: skip). ``mixed``: requests
    of one query token may sit beside longer ones, so attention gives them a launch of their
    own in the decode tile shape (a hint for speed; any value computes the same rows).
    ``seq_order``, a permutation of the requests with the longest context first, is the order
    in which the decode launches take them (a hint for speed too; ``None``: as listed).
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32
    max_seqlen_q: int
    max_seqlen_k: int
    mixed: bool = False
    seq_order: torch.Tensor | None = None  # [num_seqs] int32


class Attention(nn.Module):
    """Holds one layer's slice of the KV pool (bound by the worker after allocation).

    With ``attn_metadata=None`` (the memory-profiling pass, before the pool exists) it
    returns zeros of the output's shape and touches no cache. With ``kv_fp8`` the pool is
    e4m3 and ``k_scale``/``v_scale`` (fp32, one per local KV head, 1.0 unless the checkpoint
    gives them per tensor or per head) dequantize it: ``K ~= key_cache * k_scale[head]``.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        kv_fp8: bool = False,
        kv_head_start: int = 0,
        total_kv_heads: int | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.key_cache: torch.Tensor | None = None
        self.value_cache: torch.Tensor | None = None
        self.kv_head_start = kv_head_start
        #: KV heads of the whole model (all ranks): a per-head checkpoint scale has this many.
        self.total_kv_heads = total_kv_heads or num_kv_heads
        self.k_scale = self.v_scale = None
        if kv_fp8:
            self.k_scale = new_parameter(num_kv_heads, loader=self.kv_scale_loader)
            self.v_scale = new_parameter(num_kv_heads, loader=self.kv_scale_loader)
            for param in (self.k_scale, self.v_scale):
                param.data = param.data.float().fill_(1.0)
                param.optional = True  # type: ignore[attr-defined]

    def kv_scale_loader(self, param: nn.Parameter, source: Any, shard_id: Any = None) -> None:
        """A checkpoint's ``k_scale``/``v_scale``: one value (per tensor) or one per KV head."""
        del shard_id
        shape = source_shape(source)
        loaded = read_all(source).reshape(-1).float()
        if loaded.numel() == 1:
            param.data.fill_(loaded.item())
        elif loaded.numel() == self.total_kv_heads:
            start = self.kv_head_start
            param.data.copy_(loaded[start : start + self.num_kv_heads])
        else:
            raise ValueError(
                f"KV scales must be one value or one per KV head ({self.total_kv_heads}); got "
                f"shape {shape}"
            )
        if not bool(torch.isfinite(param.data).all() and (param.data > 0).all()):
            raise ValueError("KV cache scales must be finite and > 0")

    def bind_kv_cache(self, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
        self.key_cache, self.value_cache = key_cache, value_cache

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        attn_metadata: AttentionMetadata | None,
        positions: torch.Tensor,  # [num_tokens] int64
        cos_sin_cache: torch.Tensor,  # [max_positions, head_dim] fp32 (RotaryEmbedding's)
    ) -> torch.Tensor:
        """RoPE on the query and key at ``positions`` in the launch that writes the key and
        value into the cache, then attention over the cache. ``key`` is left unrotated (the
        cache holds its rotated rows); ``query`` is rotated in place."""
        if attn_metadata is None or self.key_cache is None or self.value_cache is None:
            return torch.zeros_like(query)
        ops.rotary_and_write_kv(
            positions,
            query,
            key,
            value,
            cos_sin_cache,
            self.key_cache,
            self.value_cache,
            attn_metadata.slot_mapping,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
        )
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
            mixed=attn_metadata.mixed,
            seq_order=attn_metadata.seq_order,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
        )
