"""KV-cache write (Triton, interpreted) against the reference scatter, bit for bit."""

from __future__ import annotations

import pytest
import torch

from metroline.kernels.kv_cache import write_kv_cache, write_kv_cache_ref


@pytest.mark.parametrize(
    ("num_kv_heads", "head_dim", "block_size"),
    [(1, 64, 16), (2, 80, 16), (8, 96, 32), (4, 128, 16), (2, 256, 32)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scatter_with_skipped_slots(num_kv_heads, head_dim, block_size, dtype):
    gen = torch.Generator().manual_seed(head_dim)
    num_blocks, num_tokens = 6, 23
    # K and V as views into a fused QKV buffer (token stride larger than heads * dim).
    width = (2 + 2 * num_kv_heads) * head_dim
    qkv = torch.randn((num_tokens, width), generator=gen).to(dtype)
    kv = qkv[:, 2 * head_dim :].view(num_tokens, 2, num_kv_heads, head_dim)
    key, value = kv[:, 0], kv[:, 1]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::5] = -1  # skipped: padding / CUDA-graph filler
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"), dtype=dtype)
    value_cache = torch.full(shape, float("nan"), dtype=dtype)
    ref_k, ref_v = key_cache.clone(), value_cache.clone()
    write_kv_cache_ref(key, value, ref_k, ref_v, slots)
    write_kv_cache(key, value, key_cache, value_cache, slots)
    torch.testing.assert_close(key_cache, ref_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(value_cache, ref_v, rtol=0, atol=0, equal_nan=True)


def test_int32_slots_and_dtype_cast():
    """int32 slot mappings work too; fp32 K/V are cast to a bf16 cache."""
    key, value = torch.randn(5, 2, 64), torch.randn(5, 2, 64)
    slots = torch.tensor([3, -1, 0, 17, 31], dtype=torch.int32)
    caches = [torch.full((2, 16, 2, 64), float("nan"), dtype=torch.bfloat16) for _ in range(4)]
    write_kv_cache_ref(key, value, caches[0], caches[1], slots.long())
    write_kv_cache(key, value, caches[2], caches[3], slots)
    torch.testing.assert_close(caches[2], caches[0], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(caches[3], caches[1], rtol=0, atol=0, equal_nan=True)
