"""Write a step's new keys and values into the paged KV cache.

Cache layout (shared by every kernel in this package and by the engine):
``key_cache`` and ``value_cache`` are ``[num_blocks, block_size, num_kv_heads, head_dim]``,
contiguous. Token ``t`` of a request lives in physical block ``block_table[t // block_size]``
at row ``t % block_size``; its flat *slot* is ``block * block_size + row``.
A negative slot means "skip this token" (padding, CUDA-graph filler).

FP8 caches (``torch.float8_e4m3fn``) hold ``clamp(x / scale[head], -448, 448)`` rounded to
nearest even, so ``x ~= cache.float() * scale[head]``. ``k_scale`` and ``v_scale`` are fp32
device tensors ``[num_kv_heads]`` (a per-tensor scale repeats on every head): tensors, never
host floats, so a CUDA graph replays whatever they hold. Caches of other dtypes take no scales.

The Triton kernel runs one program per token: it reads the token's slot and copies its
``[num_kv_heads, head_dim]`` key and value rows (any token and head strides, e.g. views into
a fused QKV buffer) into the slot, with int64 offsets since a pool can pass 2**31 elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_quant import FP8_DTYPE, FP8_MAX, quantize_fp8
from .utils import next_power_of_2, row_major_last_dim


def is_fp8_kv(
    key_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None
) -> bool:
    """Whether the cache is fp8, after checking the scales fit: an fp8 cache needs both scales
    (fp32, ``[num_kv_heads]``, on the cache's device), any other cache neither."""
    if key_cache.dtype != FP8_DTYPE:
        assert k_scale is None and v_scale is None, "KV scales belong to fp8 caches only"
        return False
    num_kv_heads = key_cache.shape[2]
    for scale in (k_scale, v_scale):
        assert scale is not None, "an fp8 KV cache needs k_scale and v_scale"
        assert scale.dtype == torch.float32 and scale.shape == (num_kv_heads,)
        assert scale.device == key_cache.device
    return True


@triton.jit
def head_scales(k_scale_ptr, v_scale_ptr, offs_h, NUM_KV_HEADS: tl.constexpr):
    """The K and V scales of heads ``offs_h``, each ``[BLOCK_H, 1]`` fp32 (padding heads 1.0)."""
    h_valid = offs_h < NUM_KV_HEADS
    k_scale = tl.load(k_scale_ptr + offs_h, mask=h_valid, other=1.0)[:, None]
    v_scale = tl.load(v_scale_ptr + offs_h, mask=h_valid, other=1.0)[:, None]
    return k_scale, v_scale


@triton.jit
def _write_kv_cache_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim], last dim contiguous
    value_ptr,  # [num_tokens, num_kv_heads, head_dim], last dim contiguous
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    slot_mapping_ptr,  # [num_tokens] int64 (int32 accepted), negative = skip
    k_scale_ptr, v_scale_ptr,  # [num_kv_heads] fp32 (FP8 only)
    stride_k_tok, stride_k_head,
    stride_v_tok, stride_v_head,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,  # powers of 2 covering the two sizes
    FP8: tl.constexpr,  # the caches are float8_e4m3fn: divide by the head's scale, clamp
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < NUM_KV_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    dst = slot * (NUM_KV_HEADS * HEAD_DIM) + offs_h[:, None] * HEAD_DIM + offs_d[None, :]
    k_src = key_ptr + token * stride_k_tok + offs_h[:, None] * stride_k_head + offs_d[None, :]
    v_src = value_ptr + token * stride_v_tok + offs_h[:, None] * stride_v_head + offs_d[None, :]
    k = tl.load(k_src, mask=mask)
    v = tl.load(v_src, mask=mask)
    if FP8:
        k_scale, v_scale = head_scales(k_scale_ptr, v_scale_ptr, offs_h, NUM_KV_HEADS)
        k = quantize_fp8(k.to(tl.float32), k_scale)
        v = quantize_fp8(v.to(tl.float32), v_scale)
    tl.store(key_cache_ptr + dst, k.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(value_cache_ptr + dst, v.to(value_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, negative = skip
    k_scale: torch.Tensor | None = None,  # [num_kv_heads] fp32, fp8 caches only
    v_scale: torch.Tensor | None = None,  # [num_kv_heads] fp32, fp8 caches only
) -> None:
    """Triton scatter; same contract as :func:`write_kv_cache_ref`."""
    num_tokens, num_kv_heads, head_dim = key.shape
    assert key_cache.is_contiguous() and value_cache.is_contiguous()
    assert key_cache.shape[2:] == (num_kv_heads, head_dim) and value_cache.shape == key_cache.shape
    assert value_cache.dtype == key_cache.dtype
    fp8 = is_fp8_kv(key_cache, k_scale, v_scale)
    if num_tokens == 0:
        return
    key, value = row_major_last_dim(key), row_major_last_dim(value)
    block_h, block_d = next_power_of_2(num_kv_heads), next_power_of_2(head_dim)
    _write_kv_cache_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        k_scale if fp8 else slot_mapping, v_scale if fp8 else slot_mapping,  # unused unless fp8
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d, FP8=fp8,
        num_warps=max(1, min(8, block_h * block_d // 256)),
    )


def write_kv_cache_ref(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, negative = skip
    k_scale: torch.Tensor | None = None,  # [num_kv_heads] fp32, fp8 caches only
    v_scale: torch.Tensor | None = None,  # [num_kv_heads] fp32, fp8 caches only
) -> None:
    """Reference scatter: ``cache.view(-1, H, D)[slot] = kv`` for every slot >= 0; for fp8
    caches ``kv`` is first ``clamp(kv.float() / scale[head], -448, 448)``."""
    if is_fp8_kv(key_cache, k_scale, v_scale):
        key = (key.float() / k_scale[:, None]).clamp(-FP8_MAX, FP8_MAX)
        value = (value.float() / v_scale[:, None]).clamp(-FP8_MAX, FP8_MAX)
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
    flat_k = key_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    flat_v = value_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    flat_k[slots] = key[valid].to(key_cache.dtype)
    flat_v[slots] = value[valid].to(value_cache.dtype)
