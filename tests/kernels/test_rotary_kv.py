"""RoPE + KV-cache write in one launch (Triton, interpreted): the same query and cache bytes as
the two launches it replaces (rotary_embedding, then write_kv_cache), bit for bit, over
16-bit, fp32 and fp8 caches; the key is left as it was; skipped slots write nothing."""

from __future__ import annotations

import pytest
import torch

from metroline.kernels.fp8_quant import FP8_DTYPE
from metroline.kernels.kv_cache import write_kv_cache
from metroline.kernels.rotary import rotary_embedding
from metroline.kernels.rotary_kv import rotary_and_write_kv, rotary_and_write_kv_ref

SHAPES = [(4, 1, 64), (8, 2, 80), (6, 3, 96), (32, 8, 128), (4, 2, 256)]


def make_step(num_heads, num_kv_heads, head_dim, dtype, seed):
    """A step's q, k, v as views into a fused QKV buffer, with positions, slots (some
    skipped) and a cos/sin cache."""
    gen = torch.Generator().manual_seed(seed)
    num_tokens, max_pos, num_slots = 13, 64, 96
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.arange(max_pos).float()[:, None] * inv_freq[None, :]
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    positions = torch.randint(0, max_pos, (num_tokens,), generator=gen)
    qkv = (3 * torch.randn((num_tokens, (num_heads + 2 * num_kv_heads) * head_dim),
                           generator=gen)).to(dtype)  # fmt: skip
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].view(num_tokens, num_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size :].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens]
    slots[::4] = -1  # padding / CUDA-graph filler: the query still rotates
    return qkv, q, k, v, positions, cos_sin, slots, num_slots // 16


def empty_caches(num_blocks, num_kv_heads, head_dim, cache_dtype):
    """NaN everywhere (fp8: its NaN code), so a stray or missing write shows."""
    shape = (num_blocks, 16, num_kv_heads, head_dim)
    nan = torch.full(shape, float("nan"))
    return nan.to(cache_dtype), nan.clone().to(cache_dtype)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), SHAPES)
@pytest.mark.parametrize("cache", ["bf16", "fp16", "fp32", "fp8"])
def test_one_launch_writes_what_the_two_launches_write(num_heads, num_kv_heads, head_dim, cache):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cache, torch.bfloat16)
    dtype = torch.float32 if cache == "fp32" else dtype
    cache_dtype = FP8_DTYPE if cache == "fp8" else dtype
    scales = {}
    if cache == "fp8":  # per-head scales, one small enough that its head clamps at +-448
        k_scale = torch.linspace(0.002, 0.05, num_kv_heads)
        scales = {"k_scale": k_scale, "v_scale": k_scale.flip(0).contiguous()}
    qkv, q, k, v, positions, cos_sin, slots, blocks = make_step(
        num_heads, num_kv_heads, head_dim, dtype, seed=head_dim + num_heads
    )
    original = qkv.clone()

    def views(buffer):  # q, k, v as the same views into a copy of the step's buffer
        return [buffer.as_strided(t.shape, t.stride(), t.storage_offset()) for t in (q, k, v)]

    two_q, two_k, two_v = views(original.clone())
    two_kc, two_vc = empty_caches(blocks, num_kv_heads, head_dim, cache_dtype)
    rotary_embedding(positions, two_q, two_k, cos_sin)
    write_kv_cache(two_k, two_v, two_kc, two_vc, slots, **scales)
    ref_q, ref_k, ref_v = views(original.clone())
    ref_kc, ref_vc = empty_caches(blocks, num_kv_heads, head_dim, cache_dtype)
    rotary_and_write_kv_ref(positions, ref_q, ref_k, ref_v, cos_sin, ref_kc, ref_vc, slots,
                            **scales)  # fmt: skip
    key_cache, value_cache = empty_caches(blocks, num_kv_heads, head_dim, cache_dtype)
    rotary_and_write_kv(positions, q, k, v, cos_sin, key_cache, value_cache, slots, **scales)
    assert same_bytes(q, two_q), "queries differ from rotary_embedding's"
    assert same_bytes(key_cache, two_kc), "key cache differs from the two launches'"
    assert same_bytes(value_cache, two_vc), "value cache differs from the two launches'"
    assert torch.equal(k, views(original)[1]), "the key is read, never written"
    exact = {"rtol": 0, "atol": 0} if dtype != torch.float32 else {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(q, ref_q, **exact)
    torch.testing.assert_close(key_cache.float(), ref_kc.float(), equal_nan=True, **exact)
    torch.testing.assert_close(value_cache.float(), ref_vc.float(), equal_nan=True, **exact)


def test_skipped_slots_rotate_the_query_and_write_nothing():
    _, q, k, v, positions, cos_sin, slots, blocks = make_step(4, 2, 64, torch.bfloat16, 3)
    slots.fill_(-1)
    before = q.clone()
    key_cache, value_cache = empty_caches(blocks, 2, 64, torch.bfloat16)
    rotary_and_write_kv(positions, q, k, v, cos_sin, key_cache, value_cache, slots)
    assert key_cache.isnan().all() and value_cache.isnan().all()
    moved = positions != 0  # position 0 rotates by nothing
    assert not torch.equal(q[moved], before[moved])
