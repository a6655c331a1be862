"""The engine's one door to the kernels: each op picks its implementation by device.

On CPU every op is the PyTorch reference from :mod:`metroline.kernels`; on CUDA the Triton
kernel beside it. Layers call only these functions, so the model code is device-agnostic.
"""

from __future__ import annotations

import torch

from metroline.kernels.activation import silu_and_mul_ref
from metroline.kernels.kv_cache import write_kv_cache_ref
from metroline.kernels.paged_attention import paged_attention_ref
from metroline.kernels.rmsnorm import fused_add_rms_norm_ref, rms_norm_ref
from metroline.kernels.rotary import rotary_embedding_ref


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_ref(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """``residual += x`` in place; returns ``rms_norm(residual)``."""
    return fused_add_rms_norm_ref(x, residual, weight, eps)


def rotary_embedding(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor
) -> None:
    rotary_embedding_ref(positions, query, key, cos_sin_cache)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return silu_and_mul_ref(x)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    write_kv_cache_ref(key, value, key_cache, value_cache, slot_mapping)


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
    """Attention of the step's queries over the paged cache (see kernels.paged_attention)."""
    del max_seqlen_q, max_seqlen_k  # launch-shape hints for the GPU kernels
    return paged_attention_ref(
        query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale, out=out
    )
