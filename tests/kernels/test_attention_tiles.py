"""The attention launcher's tile rules: which shape each launch takes, and that each shape the
rules pick for 16-bit decodes (many programs) and fp8 prompt chunks equals the reference."""

from __future__ import annotations

import pytest
import torch

from metroline.kernels import paged_attention as pa
from metroline.kernels.attention_tiles import (
    FEW_PROGRAMS_PER_SM,
    attention_config,
    decode_has_few_programs,
)
from metroline.kernels.utils import num_sms

from .test_fp8_kv import K_SCALE, V_SCALE, make_fp8_batch
from .test_paged_attention import run_and_compare


def test_few_programs_threshold():
    """16 programs an SM, as measured: on an H200 (132 SMs) with 8 KV heads, batch 256 takes
    the long-step tile and batch 1024 does not."""
    sms = 132
    assert FEW_PROGRAMS_PER_SM == 16
    assert decode_has_few_programs(FEW_PROGRAMS_PER_SM * sms - 1, sms)
    assert not decode_has_few_programs(FEW_PROGRAMS_PER_SM * sms, sms)
    assert decode_has_few_programs(256 * 8, sms) and not decode_has_few_programs(1024 * 8, sms)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rules_by_cache_type(dtype):
    """Decodes: 64 keys a step, 128 with few programs, over either cache. Chunks: 32 keys a
    step over a 16-bit cache, 64 over an fp8 one (head dim <= 128)."""
    assert attention_config(dtype, 128, 4, 1).block_n == 64
    assert attention_config(dtype, 128, 4, 1, True).block_n == 128
    assert attention_config(dtype, 128, 4, 1, False, True).block_n == 64
    assert attention_config(dtype, 128, 4, 1, True, True).block_n == 128
    assert attention_config(dtype, 128, 4, 2048).block_n == 32
    assert attention_config(dtype, 128, 4, 2048, fp8_kv=True).block_n == 64
    assert attention_config(dtype, 256, 2, 2048, fp8_kv=True).block_n == 32
    # fp32 (the exact tests) keeps its small tiles over any cache.
    assert attention_config(torch.float32, 64, 2, 9, fp8_kv=True).block_n == 32


def launch_configs(monkeypatch) -> list:
    seen = []
    launch = pa._launch
    monkeypatch.setattr(pa, "_launch", lambda *args: (seen.append(args[-4]), launch(*args)))
    return seen


@pytest.mark.parametrize("below", [True, False])
def test_decode_tile_either_side_of_the_threshold(monkeypatch, below):
    """One request short of the threshold's programs: 128 keys a step; at it: 64. Both
    exact against the reference."""
    seen = launch_configs(monkeypatch)
    num_seqs = FEW_PROGRAMS_PER_SM * num_sms(torch.device("cpu")) // 2 - (1 if below else 0)
    run_and_compare([1] * num_seqs, [17 + 9 * (b % 8) for b in range(num_seqs)],
                    num_heads=8, num_kv_heads=2, dtype=torch.bfloat16)  # fmt: skip
    assert [config.block_n for config in seen] == [128 if below else 64]


def test_fp8_chunks_take_the_wide_key_step(monkeypatch):
    """Prompt chunks over an fp8 cache with a bf16 query: 64 keys a step, exact."""
    seen = launch_configs(monkeypatch)
    q_lens, seq_lens = [9, 40, 3], [25, 70, 3]
    query, key_cache, value_cache, tables, lens, cu = make_fp8_batch(
        q_lens, seq_lens, torch.bfloat16, seed=13
    )
    ref = pa.paged_attention_ref(
        query, key_cache, value_cache, tables, lens, cu, 0.125, k_scale=K_SCALE, v_scale=V_SCALE
    )
    out = pa.paged_attention(
        query, key_cache, value_cache, tables, lens, cu, 0.125, max(q_lens), max(seq_lens),
        k_scale=K_SCALE, v_scale=V_SCALE,
    )  # fmt: skip
    assert [config.block_n for config in seen] == [64]
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < 1e-2, f"relative error {err:.2e}"
