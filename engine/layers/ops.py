"""The engine's one door to the kernels: each op picks its implementation by device.

On CPU every op is the PyTorch reference from :mod:`metroline.kernels`; on CUDA the Triton
kernel beside it. Layers call only these functions, so the model code is device-agnostic.
"""

from __future__ import annotations

import torch

from metroline.kernels import activation, kv_cache, rmsnorm, rotary, warmup
from metroline.kernels import paged_attention as attention


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.is_cuda:
        return rmsnorm.rms_norm(x, weight, eps)
    return rmsnorm.rms_norm_ref(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """``residual += x`` in place; returns ``rms_norm(residual)``."""
    if x.is_cuda:
        return rmsnorm.fused_add_rms_norm(x, residual, weight, eps)
    return rmsnorm.fused_add_rms_norm_ref(x, residual, weight, eps)


def rotary_embedding(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor
) -> None:
    if query.is_cuda:
        rotary.rotary_embedding(positions, query, key, cos_sin_cache)
    else:
        rotary.rotary_embedding_ref(positions, query, key, cos_sin_cache)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:
        return activation.silu_and_mul(x)
    return activation.silu_and_mul_ref(x)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    if key.is_cuda:
        kv_cache.write_kv_cache(key, value, key_cache, value_cache, slot_mapping)
    else:
        kv_cache.write_kv_cache_ref(key, value, key_cache, value_cache, slot_mapping)


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    max_seqlen_q: int,
    max_seqlen_k: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of the step's queries over the paged cache (see kernels.paged_attention).
    ``max_seqlen_q``/``max_seqlen_k`` are host-side upper bounds that shape the GPU launch."""
    if query.is_cuda:
        return attention.paged_attention(
            query,
            key_cache,
            value_cache,
            block_tables,
            seq_lens,
            cu_seqlens_q,
            scale,
            max_seqlen_q,
            max_seqlen_k,
            out=out,
        )
    return attention.paged_attention_ref(
        query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale, out=out
    )


def warm_up_kernels(
    key_cache: torch.Tensor, value_cache: torch.Tensor, num_heads: int, max_query_len: int
) -> None:
    """Compile every attention variant serving can meet (CUDA; nothing to do on the CPU)."""
    if key_cache.is_cuda:
        warmup.warm_up_attention(key_cache, value_cache, num_heads, max_query_len)


def compiled_kernel_variants() -> int:
    """Kernel variants compiled in this process so far (0 on the CPU)."""
    return warmup.compiled_variants()
