"""The start-up warm-up reaches every attention variant serving can launch, and leaves the
cache as it found it."""

from __future__ import annotations

import pytest
import torch

from metroline.kernels.paged_attention import attention_config
from metroline.kernels.warmup import attention_configs, warm_up_attention


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim,group", [(64, 1), (128, 4), (128, 8), (256, 2), (96, 7)])
def test_warm_up_covers_every_tile_shape(dtype, head_dim, group):
    max_query_len = 300
    covered = {(config, length > 1) for length, config in attention_configs(
        dtype, head_dim, group, max_query_len
    )}  # fmt: skip
    for length in range(1, max_query_len + 1):
        for few in (False, True):
            assert (attention_config(dtype, head_dim, group, length, few), length > 1) in covered


def test_warm_up_runs_on_the_cache_without_writing_it():
    generator = torch.Generator().manual_seed(0)
    shape = (6, 16, 2, 64)  # blocks, block size, KV heads, head dim
    key_cache = torch.randn(shape, generator=generator).to(torch.bfloat16)
    value_cache = torch.randn(shape, generator=generator).to(torch.bfloat16)
    before = key_cache.clone(), value_cache.clone()
    warm_up_attention(key_cache, value_cache, num_heads=4, max_query_len=40)
    assert torch.equal(key_cache, before[0]) and torch.equal(value_cache, before[1])
