"""RoPE and the KV-cache write in one launch: a step's queries rotated in place, its keys
rotated on their way into the cache, its values copied (quantized for fp8 caches).

The same bytes as :func:`metroline.kernels.rotary.rotary_embedding` followed by
:func:`metroline.kernels.kv_cache.write_kv_cache` (layouts, slots and fp8 scales as there):
the rotated key is rounded to its dtype before it is stored or quantized, as the two
launches round it. ``key`` itself is only read: its rotated rows live in the cache alone,
which is all attention reads. One program per token; a negative slot still rotates the
token's query and writes no cache row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_quant import quantize_fp8
from .kv_cache import head_scales, is_fp8_kv, write_kv_cache_ref
from .rotary import rotary_embedding_ref, rotated_heads, token_cos_sin
from .utils import next_power_of_2


# Strides stay specialised ("divisible by 16"): that is what lets rows load and store 16
# bytes at a time. They follow from the head layout alone, which the warm-up reproduces.
@triton.jit
def _rotary_write_kv_kernel(
    positions_ptr,  # [num_tokens] int64
    query_ptr,  # [num_tokens, num_heads, head_dim], rotated in place
    key_ptr,  # [num_tokens, num_kv_heads, head_dim], read only
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_ptr,  # [max_positions, head_dim] fp32: cos half, then sin half
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    slot_mapping_ptr,  # [num_tokens] int64 (int32 accepted), negative = no cache row
    k_scale_ptr, v_scale_ptr,  # [num_kv_heads] fp32 (FP8 only)
    stride_q_tok, stride_q_head,
    stride_k_tok, stride_k_head,
    stride_v_tok, stride_v_head,
    stride_cos_sin,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_Q_HEADS: tl.constexpr, BLOCK_K_HEADS: tl.constexpr,
    FP8: tl.constexpr,  # the caches are float8_e4m3fn: divide by the head's scale, clamp
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    offs_half = tl.arange(0, BLOCK_HALF)
    cos, sin = token_cos_sin(cos_sin_ptr, pos, stride_cos_sin, offs_half, HALF)

    q_ptr = query_ptr + token * stride_q_tok
    q_dtype = query_ptr.dtype.element_ty
    q_first, q_second, offs_qh, q_mask = rotated_heads(
        q_ptr, stride_q_head, cos.to(q_dtype).to(tl.float32), sin.to(q_dtype).to(tl.float32),
        offs_half, NUM_HEADS, HALF, BLOCK_Q_HEADS,
    )  # fmt: skip
    q_ptrs = q_ptr + offs_qh[:, None] * stride_q_head + offs_half[None, :]
    tl.store(q_ptrs, q_first, mask=q_mask)
    tl.store(q_ptrs + HALF, q_second, mask=q_mask)

    if slot >= 0:
        k_dtype = key_ptr.dtype.element_ty
        k_first, k_second, offs_kh, k_mask = rotated_heads(
            key_ptr + token * stride_k_tok, stride_k_head, cos.to(k_dtype).to(tl.float32),
            sin.to(k_dtype).to(tl.float32), offs_half, NUM_KV_HEADS, HALF, BLOCK_K_HEADS,
        )  # fmt: skip
        offs_d = tl.arange(0, BLOCK_D)
        v_mask = (offs_kh < NUM_KV_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
        v_src = value_ptr + token * stride_v_tok + offs_kh[:, None] * stride_v_head
        v = tl.load(v_src + offs_d[None, :], mask=v_mask)
        if FP8:
            k_scale, v_scale = head_scales(k_scale_ptr, v_scale_ptr, offs_kh, NUM_KV_HEADS)
            k_first = quantize_fp8(k_first.to(tl.float32), k_scale)
            k_second = quantize_fp8(k_second.to(tl.float32), k_scale)
            v = quantize_fp8(v.to(tl.float32), v_scale)
        row = slot * (NUM_KV_HEADS * HEAD_DIM) + offs_kh[:, None] * HEAD_DIM
        cache_dtype = key_cache_ptr.dtype.element_ty
        k_dst = key_cache_ptr + row + offs_half[None, :]
        tl.store(k_dst, k_first.to(cache_dtype), mask=k_mask)
        tl.store(k_dst + HALF, k_second.to(cache_dtype), mask=k_mask)
        v_dst = value_cache_ptr + row + offs_d[None, :]
        tl.store(v_dst, v.to(value_cache_ptr.dtype.element_ty), mask=v_mask)


def rotary_and_write_kv(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotated in place
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], read only
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_cache: torch.Tensor,  # [max_positions, head_dim] fp32
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, negative = no cache row
    k_scale: torch.Tensor | None = None,  # [num_kv_heads] fp32, fp8 caches only
    v_scale: torch.Tensor | None = None,  # [num_kv_heads] fp32, fp8 caches only
) -> None:
    """Triton launch; same contract as :func:`rotary_and_write_kv_ref`. The three inputs may
    be strided views (into a fused QKV buffer) with a contiguous last dimension."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    assert query.stride(-1) == 1 and key.stride(-1) == 1 and value.stride(-1) == 1
    assert key.shape == value.shape and head_dim % 2 == 0
    assert cos_sin_cache.stride(-1) == 1 and cos_sin_cache.shape[1] == head_dim
    assert key_cache.is_contiguous() and value_cache.is_contiguous()
    assert key_cache.shape[2:] == (num_kv_heads, head_dim) and value_cache.shape == key_cache.shape
    assert value_cache.dtype == key_cache.dtype
    fp8 = is_fp8_kv(key_cache, k_scale, v_scale)
    if num_tokens == 0:
        return
    half = head_dim // 2
    block_q_heads = next_power_of_2(num_heads)
    _rotary_write_kv_kernel[(num_tokens,)](
        positions, query, key, value, cos_sin_cache, key_cache, value_cache, slot_mapping,
        k_scale if fp8 else slot_mapping, v_scale if fp8 else slot_mapping,  # unused unless fp8
        query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        value.stride(0), value.stride(1), cos_sin_cache.stride(0),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HALF=half,
        BLOCK_HALF=next_power_of_2(half), BLOCK_D=next_power_of_2(head_dim),
        BLOCK_Q_HEADS=block_q_heads, BLOCK_K_HEADS=next_power_of_2(num_kv_heads), FP8=fp8,
        num_warps=max(1, min(8, block_q_heads * next_power_of_2(half) // 256)),
    )  # fmt: skip


def rotary_and_write_kv_ref(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Reference: :func:`rotary_embedding_ref` on ``query`` and a copy of ``key``, then
    :func:`write_kv_cache_ref` of the rotated copy and ``value``."""
    rotated = key.clone()
    rotary_embedding_ref(positions, query, rotated, cos_sin_cache)
    write_kv_cache_ref(rotated, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)
