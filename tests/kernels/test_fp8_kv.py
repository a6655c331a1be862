"""The fp8 (e4m3) KV cache: the write kernel equals its reference byte for byte, paged attention
over fp8 caches equals its reference, and the reference dequantizes with the right scales.

Scales differ per KV head throughout, so a scale applied to the wrong head, or K's scale to
V, fails. Caches start as fp8 NaN codes where no token was written (as in
test_paged_attention), so a kernel that reads outside a context fails too.
"""

from __future__ import annotations

import pytest
import torch

from metroline.kernels.fp8_quant import FP8_DTYPE, FP8_MAX
from metroline.kernels.kv_cache import write_kv_cache, write_kv_cache_ref
from metroline.kernels.paged_attention import paged_attention, paged_attention_ref

from .test_fp8_quant import assert_round_trip
from .test_paged_attention import make_batch

K_SCALE = torch.tensor([0.011, 0.023, 0.0045])
V_SCALE = torch.tensor([0.0031, 0.017, 0.052])


def quantize_cache(cache: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """An fp32 cache as fp8 codes with per-head scales (NaN stays NaN)."""
    scaled = cache / scale[None, None, :, None]
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_cache(cache: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return cache.float() * scale[None, None, :, None]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_write_matches_reference_bytes(dtype):
    gen = torch.Generator().manual_seed(7)
    num_tokens, num_kv_heads, head_dim, block_size, num_blocks = 23, 3, 80, 16, 4
    width = (2 + 2 * num_kv_heads) * head_dim  # K and V as views into a fused QKV buffer
    qkv = torch.randn((num_tokens, width), generator=gen) * 2.0
    kv = qkv[:, 2 * head_dim :].view(num_tokens, 2, num_kv_heads, head_dim)
    kv[3, :, 1, :7] = 1e3  # beyond 448 * scale: clamped to +-448, never NaN
    kv[4, :, 2, 5:9] = -1e3
    kv[5, :, 0] *= 1e-4  # subnormal codes
    qkv = qkv.to(dtype)
    kv = qkv[:, 2 * head_dim :].view(num_tokens, 2, num_kv_heads, head_dim)
    key, value = kv[:, 0], kv[:, 1]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::6] = -1  # skipped: padding / CUDA-graph filler
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    caches = [torch.full(shape, float("nan")).to(FP8_DTYPE) for _ in range(4)]
    scales = K_SCALE[:num_kv_heads], V_SCALE[:num_kv_heads]
    write_kv_cache_ref(key, value, caches[0], caches[1], slots, *scales)
    write_kv_cache(key, value, caches[2], caches[3], slots, *scales)
    for got, want in ((caches[2], caches[0]), (caches[3], caches[1])):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    written = slots[slots >= 0]
    flat_k = caches[2].view(-1, num_kv_heads, head_dim)
    assert not flat_k[written].float().isnan().any()
    assert flat_k.float().isnan().sum() == (flat_k.shape[0] - len(written)) * 3 * head_dim
    token_3 = int(slots[3])
    assert (flat_k[token_3, 1, :7].float() == FP8_MAX).all()
    # Every written element dequantizes within the e4m3 bound, clamped ones excepted.
    in_range = (key.float() / K_SCALE[:, None]).abs() <= FP8_MAX
    valid = (slots >= 0)[:, None, None] & in_range
    deq = flat_k[slots.clamp(min=0)]
    scale = K_SCALE[None, :, None].expand_as(key)
    assert_round_trip(key.float()[valid], deq[valid], scale[valid])


def test_scales_belong_to_fp8_caches_only():
    key = value = torch.randn(2, 3, 64)
    slots = torch.tensor([0, 1])
    bf16 = torch.zeros(1, 16, 3, 64, dtype=torch.bfloat16)
    with pytest.raises(AssertionError, match="fp8 caches only"):
        write_kv_cache(key, value, bf16, bf16.clone(), slots, K_SCALE, V_SCALE)
    fp8 = torch.zeros(1, 16, 3, 64, dtype=FP8_DTYPE)
    with pytest.raises(AssertionError, match="needs k_scale and v_scale"):
        write_kv_cache_ref(key, value, fp8, fp8.clone(), slots)


def make_fp8_batch(q_lens, seq_lens, query_dtype, seed):
    """make_batch's ragged batch with fp8 caches (GQA: 6 query heads over 3 KV heads)."""
    query, key_cache, value_cache, tables, lens, cu = make_batch(
        q_lens, seq_lens, num_heads=6, num_kv_heads=3, head_dim=64, block_size=16,
        dtype=torch.float32, seed=seed,
    )  # fmt: skip
    key_cache = quantize_cache(key_cache * 3.0, K_SCALE)  # ~ +-4 / 0.0045 would clamp: fine
    value_cache = quantize_cache(value_cache, V_SCALE)
    return query.to(query_dtype), key_cache, value_cache, tables, lens, cu


MIXED = ([1, 9, 1, 0, 3, 1], [40, 25, 17, 9, 3, 70])  # decodes, chunks, an idle request


@pytest.mark.parametrize("query_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_attention_over_fp8_cache_matches_reference(query_dtype, num_splits):
    q_lens, seq_lens = MIXED
    query, key_cache, value_cache, tables, lens, cu = make_fp8_batch(
        q_lens, seq_lens, query_dtype, seed=11
    )
    ref = paged_attention_ref(
        query, key_cache, value_cache, tables, lens, cu, 0.125, k_scale=K_SCALE, v_scale=V_SCALE
    )
    out = paged_attention(
        query, key_cache, value_cache, tables, lens, cu, 0.125, max(q_lens), max(seq_lens),
        num_splits=num_splits, k_scale=K_SCALE, v_scale=V_SCALE,
    )  # fmt: skip
    assert out.dtype == query_dtype and ref.dtype == query_dtype
    assert torch.isfinite(out).all(), "unwritten or NaN-contaminated output rows"
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < (1e-5 if query_dtype == torch.float32 else 1e-2), f"relative error {err:.2e}"


def test_reference_dequantizes_with_each_heads_scales():
    """The reference over fp8 codes equals the reference over the dequantized fp32 cache."""
    q_lens, seq_lens = MIXED
    query, key_cache, value_cache, tables, lens, cu = make_fp8_batch(
        q_lens, seq_lens, torch.float32, seed=12
    )
    fp8 = paged_attention_ref(
        query, key_cache, value_cache, tables, lens, cu, 0.125, k_scale=K_SCALE, v_scale=V_SCALE
    )
    k_deq, v_deq = dequantize_cache(key_cache, K_SCALE), dequantize_cache(value_cache, V_SCALE)
    fp32 = paged_attention_ref(query, k_deq, v_deq, tables, lens, cu, 0.125)
    torch.testing.assert_close(fp8, fp32, rtol=1e-6, atol=1e-6)
