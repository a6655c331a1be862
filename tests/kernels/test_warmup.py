"""The start-up warm-up reaches every attention and RoPE + KV-write variant serving can launch,
and leaves the cache as it found it."""

from __future__ import annotations

import pytest
import torch

from metroline.kernels import paged_attention as pa
from metroline.kernels import rotary_kv
from metroline.kernels.attention_tiles import FEW_PROGRAMS_PER_SM, attention_config
from metroline.kernels.warmup import attention_configs, warm_up_attention, warm_up_rotary_kv


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
    warm_up_rotary_kv(key_cache, value_cache, num_heads=4)
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


def record_variants(monkeypatch) -> set:
    """Stub the attention kernel: each launch adds its compile-time arguments (what picks a
    compiled variant) to the returned set, and computes nothing."""
    seen: set = set()

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **meta: seen.add(tuple(sorted(meta.items())))

    monkeypatch.setattr(pa, "_paged_attention_kernel", Recorder())
    return seen


@pytest.mark.parametrize("fp8", [False, True])
def test_serving_launches_only_warmed_variants(monkeypatch, fp8):
    """Decodes of few and many programs, chunks of every tile height, mixed steps, split and
    unsplit contexts: every kernel variant these launch was launched by the warm-up."""
    seen = record_variants(monkeypatch)
    num_heads, num_kv_heads, head_dim, max_query_len = 8, 2, 64, 40
    cache_dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    shape = (64, 16, num_kv_heads, head_dim)
    key_cache = torch.zeros(shape).to(cache_dtype)
    value_cache = torch.zeros(shape).to(cache_dtype)
    scales = {"k_scale": torch.ones(num_kv_heads), "v_scale": torch.ones(num_kv_heads)}
    scales = scales if fp8 else {}
    warm_up_attention(key_cache, value_cache, num_heads, max_query_len,
                      query_dtype=torch.bfloat16, **scales)  # fmt: skip
    warmed = set(seen)
    seen.clear()
    many = 2 * FEW_PROGRAMS_PER_SM * 4 // num_kv_heads  # the interpreter's 4 nominal SMs
    cases = [([1] * 3, 500, False), ([1] * many, 40, False), ([2, 1], 30, False),
             ([5, 1, 1], 60, True), ([17, 3], 40, False), ([40, 1, 1], 900, True),
             ([1, 40], 40, True), ([8] * 3, 2000, False)]  # fmt: skip
    for q_lens, context, mixed in cases:
        num_seqs = len(q_lens)
        query = torch.zeros(sum(q_lens), num_heads, head_dim, dtype=torch.bfloat16)
        tables = torch.zeros(num_seqs, -(-context // 16), dtype=torch.int32)
        lens = torch.full((num_seqs,), context, dtype=torch.int32)
        cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
        for num_splits in (None, 1, 3):
            pa.paged_attention(query, key_cache, value_cache, tables, lens, cu, 0.1,
                               max(q_lens), context, mixed=mixed, num_splits=num_splits,
                               **scales)  # fmt: skip
    assert seen, "no launch recorded"
    assert seen <= warmed, f"variants serving would compile: {seen - warmed}"


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(8, 2, 64), (6, 3, 72)])
def test_rotary_kv_warm_up_covers_serving_launches(
    monkeypatch, fp8, qk_norm, num_heads, num_kv_heads, head_dim
):
    """The RoPE + KV-write launches of a step (q, k, v views into the QKV projection's output,
    or with a QK norm q and k tensors of their own) meet only the variant the warm-up
    compiled: the same compile-time arguments, argument dtypes, pointer alignments and
    integer divisibility."""
    seen: set = set()

    def describe(args, meta):  # what Triton specialises a variant on
        kinds = [
            (str(a.dtype), a.data_ptr() % 16 == 0) if torch.is_tensor(a) else (a % 16 == 0, a == 1)
            for a in args
        ]
        return tuple(sorted(meta.items())), tuple(kinds)

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **meta: seen.add(describe(args, meta))

    monkeypatch.setattr(rotary_kv, "_rotary_write_kv_kernel", Recorder())
    dtype = torch.bfloat16
    cache_dtype = torch.float8_e4m3fn if fp8 else dtype
    key_cache = torch.zeros(8, 16, num_kv_heads, head_dim).to(cache_dtype)
    value_cache = torch.zeros_like(key_cache)
    scales = {"k_scale": torch.ones(num_kv_heads), "v_scale": torch.ones(num_kv_heads)}
    scales = scales if fp8 else {}
    if fp8:
        with pytest.raises(ValueError, match="query_dtype"):
            warm_up_rotary_kv(key_cache, value_cache, num_heads, **scales)
    warm_up_rotary_kv(key_cache, value_cache, num_heads, query_dtype=dtype, **scales)
    warmed = set(seen)
    seen.clear()
    widths = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    cos_sin = torch.zeros(4096, head_dim)
    for num_tokens in (1, 7, 300):
        qkv = torch.zeros(num_tokens, sum(widths), dtype=dtype)
        q, k, v = (p.view(num_tokens, -1, head_dim) for p in qkv.split(widths, dim=-1))
        if qk_norm:
            q, k = q.contiguous(), k.contiguous()
        positions = torch.arange(num_tokens)
        slots = torch.arange(num_tokens) - 1
        rotary_kv.rotary_and_write_kv(positions, q, k, v, cos_sin, key_cache, value_cache, slots,
                                      **scales)  # fmt: skip
    assert seen, "no launch recorded"
    assert seen <= warmed, f"variants serving would compile: {seen - warmed}"
