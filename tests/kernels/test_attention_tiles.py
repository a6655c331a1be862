"""The attention launcher's tile rules: which shape each launch takes, and that the shapes the
rules pick over fp8 caches (decodes either side of the few-programs threshold, prompt
chunks) match the reference (16-bit decodes run the rules in test_paged_attention.py); and
the order in which a decode launch takes its requests (``seq_order``)."""

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
from .test_paged_attention import make_batch


def test_few_programs_threshold():
    """8 programs an SM, as measured: on an H200 (132 SMs) with 8 KV heads, batch 64 is few
    and batch 256 is not."""
    sms = 132
    assert FEW_PROGRAMS_PER_SM == 8
    assert decode_has_few_programs(FEW_PROGRAMS_PER_SM * sms - 1, sms)
    assert not decode_has_few_programs(FEW_PROGRAMS_PER_SM * sms, sms)
    assert decode_has_few_programs(64 * 8, sms) and not decode_has_few_programs(256 * 8, sms)


def decode_tile(config) -> tuple[int, int, int]:
    return config.block_n, config.num_warps, config.num_stages


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rules_by_cache_type(dtype):
    """Decodes: 64 keys a step on 2 warps over a 16-bit cache, few programs or many; over an
    fp8 cache 32 keys on 1 warp, or the 16-bit tile with few programs; head dim 256 and
    groups over 16: 4 warps, 64 keys (128 with few), halved at head dim 256. Chunks: 32 keys
    a step over a 16-bit cache, 64 over an fp8 one (head dim <= 128)."""
    for few in (False, True):
        assert decode_tile(attention_config(dtype, 128, 4, 1, few)) == (64, 2, 2)
        assert attention_config(dtype, 128, 4, 1, few).block_m == 16
    assert decode_tile(attention_config(dtype, 128, 4, 1, False, True)) == (32, 1, 2)
    assert decode_tile(attention_config(dtype, 128, 4, 1, True, True)) == (64, 2, 2)
    assert decode_tile(attention_config(dtype, 256, 2, 1, False, True)) == (32, 4, 2)
    assert decode_tile(attention_config(dtype, 256, 2, 1, True)) == (64, 4, 2)
    # Groups of 32 query heads (32-row tiles): the 4-warp tile, over either cache.
    assert decode_tile(attention_config(dtype, 128, 32, 1, False, True)) == (64, 4, 2)
    assert decode_tile(attention_config(dtype, 128, 32, 1, True)) == (128, 4, 2)
    assert attention_config(dtype, 128, 32, 1).block_m == 32
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


def fp8_launch_error(q_lens: list[int], seq_lens: list[int], seed: int) -> float:
    """Relative error of one bf16-query launch over fp8 caches against the reference."""
    query, key_cache, value_cache, tables, lens, cu = make_fp8_batch(
        q_lens, seq_lens, torch.bfloat16, seed=seed
    )
    ref = pa.paged_attention_ref(
        query, key_cache, value_cache, tables, lens, cu, 0.125, k_scale=K_SCALE, v_scale=V_SCALE
    )
    out = pa.paged_attention(
        query, key_cache, value_cache, tables, lens, cu, 0.125, max(q_lens), max(seq_lens),
        k_scale=K_SCALE, v_scale=V_SCALE,
    )  # fmt: skip
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("below", [True, False])
def test_fp8_decode_tile_either_side_of_the_threshold(monkeypatch, below):
    """Over fp8 caches (3 KV heads), one request short of the threshold's programs: the
    2-warp tile of 64 keys; at it: 1 warp, 32 keys. Both within bf16 rounding of the
    reference, over contexts of whole, partial and single blocks."""
    seen = launch_configs(monkeypatch)
    num_seqs = -(-FEW_PROGRAMS_PER_SM * num_sms(torch.device("cpu")) // 3) - (1 if below else 0)
    seq_lens = [1 + 9 * (b % 8) for b in range(num_seqs)]
    err = fp8_launch_error([1] * num_seqs, seq_lens, seed=5)
    assert [decode_tile(config) for config in seen] == [(64, 2, 2) if below else (32, 1, 2)]
    assert err < 1e-2, f"relative error {err:.2e}"


def test_fp8_chunks_take_the_wide_key_step(monkeypatch):
    """Prompt chunks over an fp8 cache with a bf16 query: 64 keys a step, exact."""
    seen = launch_configs(monkeypatch)
    err = fp8_launch_error([9, 40, 3], [25, 70, 3], seed=13)
    assert [config.block_n for config in seen] == [64]
    assert err < 1e-2, f"relative error {err:.2e}"


@pytest.mark.parametrize("many", [True, False])
def test_decode_launch_takes_requests_in_seq_order(many):
    """With many programs a decode launch takes its requests in ``seq_order``: a permutation
    (longest first) writes every row as the listed order does, bit for bit, and the launch
    does read it: an order naming request 0 alone leaves the other rows unwritten. With few
    programs (one wave) the order is not read."""
    num_seqs = 20 if many else 3  # 2 KV heads: 40 programs >= 8 an SM of the CPU's 4, or 6
    assert decode_has_few_programs(num_seqs * 2, num_sms(torch.device("cpu"))) is not many
    seq_lens = [1 + 13 * (b % 7) for b in range(num_seqs)]
    query, key_cache, value_cache, tables, lens, cu = make_batch(
        [1] * num_seqs, seq_lens, num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
        dtype=torch.bfloat16, seed=21,
    )  # fmt: skip

    def launch(order):
        out = torch.full_like(query, float("nan"))
        pa.paged_attention(query, key_cache, value_cache, tables, lens, cu, 0.125, 1,
                           max(seq_lens), out=out, seq_order=order)  # fmt: skip
        return out

    listed = launch(None)
    ref = pa.paged_attention_ref(query, key_cache, value_cache, tables, lens, cu, 0.125)
    err = ((listed.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < 1e-2, f"relative error {err:.2e}"
    longest_first = torch.argsort(lens, descending=True, stable=True).to(torch.int32)
    assert torch.equal(launch(longest_first), listed)
    only_first = launch(torch.zeros(num_seqs, dtype=torch.int32))
    assert torch.equal(only_first[0], listed[0])
    assert only_first[1:].isnan().all() if many else torch.equal(only_first, listed)
