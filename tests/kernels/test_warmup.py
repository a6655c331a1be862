"""The start-up warm-up reaches every attention variant serving can launch, and leaves the
cache as it found it."""

from __future__ import annotations

import pytest
import torch

from metroline.kernels.attention_tiles import attention_config
from metroline.kernels.warmup import attention_configs, warm_up_attention


@pytest.mark.parametrize("fp8_kv", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim,group", [(64, 1), (128, 4), (128, 8), (256, 2), (96, 7)])
def test_warm_up_covers_every_tile_shape(dtype, head_dim, group, fp8_kv):
    max_query_len = 300
    covered = {(config, length > 1) for length, config in attention_configs(
        dtype, head_dim, group, max_query_len, fp8_kv
    )}  # fmt: skip
    for length in range(1, max_query_len + 1):
        for few in (False, True):
            config = attention_config(dtype, head_dim, group, length, few, fp8_kv)
            assert (config, length > 1) in covered


def test_warm_up_runs_on_the_cache_without_writing_it():
    generator = torch.Generator().manual_seed(0)
    shape = (6, 16, 2, 64)  # blocks, block size, KV heads, head dim
    key_cache = torch.randn(shape, generator=generator).to(torch.bfloat16)
    value_cache = torch.randn(shape, generator=generator).to(torch.bfloat16)
    before = key_cache.clone(), value_cache.clone()
    warm_up_attention(key_cache, value_cache, num_heads=4, max_query_len=40)
    assert torch.equal(key_cache, before[0]) and torch.equal(value_cache, before[1])


def test_warm_up_reads_an_fp8_cache_with_the_model_dtype():
    """An fp8 cache is warmed with the queries serving sends (the model's dtype) and its
    scales; without the query dtype the variants would be the wrong ones: refused."""
    shape = (6, 16, 2, 64)
    key_cache = torch.randn(shape).to(torch.float8_e4m3fn)
    value_cache = torch.randn(shape).to(torch.float8_e4m3fn)
    scales = {"k_scale": torch.tensor([0.5, 2.0]), "v_scale": torch.tensor([1.0, 0.25])}
    before = key_cache.view(torch.uint8).clone(), value_cache.view(torch.uint8).clone()
    with pytest.raises(ValueError, match="query_dtype"):
        warm_up_attention(key_cache, value_cache, num_heads=4, max_query_len=8, **scales)
    warm_up_attention(
        key_cache, value_cache, num_heads=4, max_query_len=8, query_dtype=torch.bfloat16, **scales
    )
    assert torch.equal(key_cache.view(torch.uint8), before[0])
    assert torch.equal(value_cache.view(torch.uint8), before[1])
