"""Rotary position embedding, neox layout (rotate halves), applied to q and k in place.

``cos_sin_cache`` is ``[max_positions, head_dim]`` in fp32: the first ``head_dim/2`` columns
hold ``cos(pos * inv_freq)``, the rest ``sin(pos * inv_freq)``. RoPE scaling (llama3, YaRN
with its attention factor, linear, dynamic NTK) lives in that cache, which
``engine/layers/rotary.py`` builds: this kernel knows none of it. As in Hugging Face, cos
and sin are cast to the input dtype before they multiply.

The Triton kernel runs one program per token and rotates all of its query and key heads, with
Hugging Face's rounding (each product rounded to the input dtype, then the sum): for 16-bit
inputs the result matches the reference bit for bit up to the exp/cos of the cache itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import next_power_of_2


@triton.jit
def token_cos_sin(cos_sin_ptr, pos, stride_cos_sin, offs_half, HALF: tl.constexpr):
    """cos and sin of position ``pos``, each ``[1, BLOCK_HALF]`` fp32 (padding columns 0)."""
    half_valid = offs_half < HALF
    cs_ptr = cos_sin_ptr + pos * stride_cos_sin + offs_half
    cos = tl.load(cs_ptr, mask=half_valid, other=0.0)[None, :]
    sin = tl.load(cs_ptr + HALF, mask=half_valid, other=0.0)[None, :]
    return cos, sin


@triton.jit
def rotated_heads(
    x_ptr,  # this token's [num_heads, head_dim] rows, last dim contiguous
    stride_head,
    cos,
    sin,  # [1, BLOCK_HALF] in the input dtype, upcast to fp32
    offs_half,  # [BLOCK_HALF]
    NUM_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
):
    """This token's heads rotated, with Hugging Face's rounding: the two halves of each row
    ``[BLOCK_HEADS, BLOCK_HALF]`` in the input dtype, the head offsets and the mask of real
    (head, column) pairs."""
    offs_h = tl.arange(0, BLOCK_HEADS)
    mask = (offs_h < NUM_HEADS)[:, None] & (offs_half < HALF)[None, :]
    ptrs = x_ptr + offs_h[:, None] * stride_head + offs_half[None, :]  # [BLOCK_HEADS, BLOCK_HALF]
    x1 = tl.load(ptrs, mask=mask, other=0.0)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    # x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x2, x1); each op rounded.
    a1 = (x1 * cos).to(dtype).to(tl.float32)
    b1 = (x2 * sin).to(dtype).to(tl.float32)
    a2 = (x2 * cos).to(dtype).to(tl.float32)
    b2 = (x1 * sin).to(dtype).to(tl.float32)
    return (a1 - b1).to(dtype), (a2 + b2).to(dtype), offs_h, mask


@triton.jit
def _rotate_heads(
    x_ptr, stride_head, cos, sin, offs_half,
    NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr,
):  # fmt: skip
    """:func:`rotated_heads`, stored back in place."""
    first, second, offs_h, mask = rotated_heads(
        x_ptr, stride_head, cos, sin, offs_half, NUM_HEADS, HALF, BLOCK_HEADS
    )
    ptrs = x_ptr + offs_h[:, None] * stride_head + offs_half[None, :]
    tl.store(ptrs, first, mask=mask)
    tl.store(ptrs + HALF, second, mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr,  # [num_tokens] int64
    query_ptr,  # [num_tokens, num_heads, head_dim], rotated in place
    key_ptr,  # [num_tokens, num_kv_heads, head_dim], rotated in place
    cos_sin_ptr,  # [max_positions, head_dim] fp32: cos half, then sin half
    stride_q_tok,
    stride_q_head,
    stride_k_tok,
    stride_k_head,
    stride_cos_sin,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_Q_HEADS: tl.constexpr,
    BLOCK_K_HEADS: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_half = tl.arange(0, BLOCK_HALF)
    cos, sin = token_cos_sin(cos_sin_ptr, pos, stride_cos_sin, offs_half, HALF)
    q_ptr = query_ptr + token * stride_q_tok
    k_ptr = key_ptr + token * stride_k_tok
    dtype = query_ptr.dtype.element_ty
    q_cos = cos.to(dtype).to(tl.float32)
    q_sin = sin.to(dtype).to(tl.float32)
    _rotate_heads(q_ptr, stride_q_head, q_cos, q_sin, offs_half, NUM_HEADS, HALF, BLOCK_Q_HEADS)
    k_dtype = key_ptr.dtype.element_ty
    k_cos = cos.to(k_dtype).to(tl.float32)
    k_sin = sin.to(k_dtype).to(tl.float32)
    _rotate_heads(k_ptr, stride_k_head, k_cos, k_sin, offs_half, NUM_KV_HEADS, HALF, BLOCK_K_HEADS)


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotated in place
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], rotated in place
    cos_sin_cache: torch.Tensor,  # [max_positions, head_dim] fp32
) -> None:
    """Triton RoPE; same contract as :func:`rotary_embedding_ref`. ``query`` and ``key`` may
    be strided views (into a fused QKV buffer) but need a contiguous last dimension."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    assert query.stride(-1) == 1 and key.stride(-1) == 1, "rotated in place: need unit stride"
    assert cos_sin_cache.stride(-1) == 1 and cos_sin_cache.shape[1] == head_dim
    if num_tokens == 0:
        return
    half = head_dim // 2
    block_q_heads, block_k_heads = next_power_of_2(num_heads), next_power_of_2(num_kv_heads)
    block_half = next_power_of_2(half)
    _rotary_kernel[(num_tokens,)](
        positions,
        query,
        key,
        cos_sin_cache,
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        cos_sin_cache.stride(0),
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HALF=half,
        BLOCK_HALF=block_half,
        BLOCK_Q_HEADS=block_q_heads,
        BLOCK_K_HEADS=block_k_heads,
        num_warps=max(1, min(8, block_q_heads * block_half // 256)),
    )


def rotary_embedding_ref(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotated in place
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], rotated in place
    cos_sin_cache: torch.Tensor,  # [max_positions, head_dim] fp32
) -> None:
    """Reference: ``x = x * cos + rotate_half(x) * sin`` for q and k."""
    half = cos_sin_cache.shape[1] // 2
    cos_sin = cos_sin_cache[positions.long()]
    for x in (query, key):
        cos = cos_sin[:, None, :half].to(x.dtype)
        sin = cos_sin[:, None, half:].to(x.dtype)
        cos = torch.cat((cos, cos), dim=-1)
        sin = torch.cat((sin, sin), dim=-1)
        x1, x2 = x[..., :half], x[..., half:]
        rotated = torch.cat((-x2, x1), dim=-1)
        x.copy_(x * cos + rotated * sin)
