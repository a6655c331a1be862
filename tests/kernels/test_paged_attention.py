"""Paged attention (Triton, interpreted) against the PyTorch reference on ragged batches.

The cache is NaN everywhere a request's context does not reach (other requests' free blocks,
the tail of a last block, table entries past the context), and the output starts as NaN: a
kernel that reads outside the context or leaves a row unwritten fails.
"""

from __future__ import annotations

import math

import pytest
import torch

from metroline.kernels import paged_attention as pa
from metroline.kernels.attention_tiles import attention_config
from metroline.kernels.paged_attention import paged_attention, paged_attention_ref


def make_batch(q_lens, seq_lens, *, num_heads, num_kv_heads, head_dim, block_size, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    num_seqs = len(q_lens)
    blocks_per_seq = [math.ceil(s / block_size) for s in seq_lens]
    max_blocks = max(blocks_per_seq) + 1  # one spare column: entries past a context
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks stay NaN
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"), dtype=dtype)
    value_cache = torch.full(shape, float("nan"), dtype=dtype)
    flat_k = key_cache.view(-1, num_kv_heads, head_dim)
    flat_v = value_cache.view(-1, num_kv_heads, head_dim)
    order = torch.randperm(num_blocks, generator=gen)
    poison_block = int(order[-1])  # never holds a token; unused table entries point here
    block_tables = torch.full((num_seqs, max_blocks), poison_block, dtype=torch.int32)
    used = 0
    for b, seq_len in enumerate(seq_lens):
        blocks = order[used : used + blocks_per_seq[b]]
        used += blocks_per_seq[b]
        block_tables[b, : len(blocks)] = blocks.int()
        slots = blocks[torch.arange(seq_len) // block_size] * block_size
        slots += torch.arange(seq_len) % block_size
        kv_shape = (seq_len, num_kv_heads, head_dim)
        flat_k[slots] = torch.randn(kv_shape, generator=gen).to(dtype)
        flat_v[slots] = torch.randn(kv_shape, generator=gen).to(dtype)
    num_tokens = sum(q_lens)
    query = torch.randn((num_tokens, num_heads, head_dim), generator=gen).to(dtype)
    cu_seqlens_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    return query, key_cache, value_cache, block_tables, seq_lens_t, cu_seqlens_q


def run_and_compare(q_lens, seq_lens, *, num_heads=8, num_kv_heads=2, head_dim=64,
                    block_size=16, dtype=torch.float32, num_splits=None, seed=0, mixed=False):
    query, key_cache, value_cache, block_tables, seq_lens_t, cu = make_batch(
        q_lens, seq_lens, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=block_size, dtype=dtype, seed=seed,
    )
    scale = head_dim**-0.5
    ref = paged_attention_ref(query, key_cache, value_cache, block_tables, seq_lens_t, cu, scale)
    out = torch.full_like(query, float("nan"))
    paged_attention(
        query, key_cache, value_cache, block_tables, seq_lens_t, cu, scale,
        max(q_lens), max(seq_lens), out=out, num_splits=num_splits, mixed=mixed,
    )
    assert torch.isfinite(out).all(), "unwritten or NaN-contaminated output rows"
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    assert err < bound, f"relative error {err:.2e}"


# Contexts ending exactly on (16, 32) and just past (17, 33) a block boundary, and 1 token.
BOUNDARY_CONTEXTS = [1, 15, 16, 17, 32, 33, 70]


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_ragged(group, dtype):
    run_and_compare([1] * len(BOUNDARY_CONTEXTS), BOUNDARY_CONTEXTS,
                    num_heads=2 * group, num_kv_heads=2, dtype=dtype)


@pytest.mark.parametrize("head_dim", [96, 256])
def test_decode_few_programs_long_steps(head_dim):
    """Two requests, one KV head: few programs (at head dim 256 the long-step tile)."""
    run_and_compare([1, 1], [129, 300], num_heads=4, num_kv_heads=1, head_dim=head_dim,
                    dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_from_scratch(dtype):
    run_and_compare([16, 17, 5, 33], [16, 17, 5, 33], num_heads=8, num_kv_heads=2, dtype=dtype)


@pytest.mark.parametrize("group", [1, 4, 8])
def test_prefix_hit_mid_block(group):
    # 21 and 37 cached tokens: the new chunk starts inside a block (21 % 16 = 5).
    run_and_compare([19, 11], [40, 48], num_heads=group, num_kv_heads=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mixed_prefill_chunks_and_decodes(dtype):
    # Decodes, a chunk after a prefix, a fresh prompt, and a request with no new token.
    run_and_compare([1, 37, 1, 0, 5, 1], [33, 50, 16, 9, 5, 17], dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("group", [1, 4])
def test_mixed_launches_decodes_apart(dtype, num_splits, group):
    """``mixed``: the chunks' launch (split or not) skips one-token requests, the decode
    launch skips the rest; every row is written once and equals the reference. A chunk of
    one token after a prefix is a decode to the kernel, and a request with no token is no
    one's."""
    run_and_compare([1, 37, 1, 0, 5, 1, 1], [33, 50, 16, 9, 5, 17, 70], num_heads=4 * group,
                    num_kv_heads=4, dtype=dtype, num_splits=num_splits, mixed=True)


def test_mixed_takes_two_launches_only_where_decodes_need_no_split(monkeypatch):
    """Many requests: chunks, then the one-token requests apart. One decode over a long
    context beside a short chunk: the split rule would split it, which the one-token launch
    does not, so the single (split) launch serves the step."""
    filters = []
    launch = pa._launch
    monkeypatch.setattr(pa, "_launch", lambda *args: (filters.append(args[-1]), launch(*args)))
    run_and_compare([1, 37, 1, 0, 5, 1, 1], [33, 50, 16, 9, 5, 17, 70], num_heads=16,
                    num_kv_heads=4, mixed=True)
    assert filters == [pa.ROWS_MANY, pa.ROWS_ONE]
    filters.clear()
    run_and_compare([1, 5], [400, 5], num_heads=4, num_kv_heads=2, mixed=True)
    assert filters == [pa.ROWS_ALL]


def test_mixed_without_decodes_or_chunks():
    """``mixed`` with only chunks, or only decodes (max_seqlen_q 1: one launch), is exact too."""
    run_and_compare([7, 37, 2], [20, 50, 2], mixed=True)
    run_and_compare([1, 1, 1], [20, 50, 2], mixed=True)


def test_mixed_rejects_a_tile_override():
    query, key_cache, value_cache, block_tables, seq_lens_t, cu = make_batch(
        [1, 3], [10, 3], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
        dtype=torch.float32, seed=4,
    )
    config = attention_config(torch.float32, 64, 2, 3)
    with pytest.raises(ValueError, match="mixed"):
        paged_attention(query, key_cache, value_cache, block_tables, seq_lens_t, cu, 0.1, 3, 10,
                        mixed=True, config=config)


@pytest.mark.parametrize("num_splits", [2, 3, 5])
def test_split_kv_decode(num_splits):
    run_and_compare([1] * 5, [1, 16, 17, 65, 130], num_heads=8, num_kv_heads=2,
                    num_splits=num_splits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_kv_mixed(dtype):
    # Splits that a short row sees no key of must not disturb the merge.
    run_and_compare([1, 20, 3], [90, 20, 45], num_splits=4, dtype=dtype)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_head_dims_block_32(head_dim):
    run_and_compare([1, 9, 1], [33, 40, 64], num_heads=4, num_kv_heads=1,
                    head_dim=head_dim, block_size=32)


def test_strided_query_and_padding_tokens():
    """Query as a view into a fused QKV buffer; trailing padding tokens (CUDA-graph filler)
    beyond cu_seqlens_q[-1] are left alone, also by the split merge."""
    q_lens, seq_lens = [1, 6, 1], [20, 6, 48]
    query, key_cache, value_cache, block_tables, seq_lens_t, cu = make_batch(
        q_lens, seq_lens, num_heads=4, num_kv_heads=1, head_dim=64, block_size=16,
        dtype=torch.float32, seed=3,
    )
    num_tokens, padding = query.shape[0], 2
    qkv = torch.randn(num_tokens + padding, 6 * 64)
    strided_q = qkv[:, : 4 * 64].view(num_tokens + padding, 4, 64)
    strided_q[:num_tokens] = query
    ref = paged_attention_ref(query, key_cache, value_cache, block_tables, seq_lens_t, cu, 0.125)
    for num_splits in (1, 3):
        out = torch.full_like(strided_q, float("nan"))
        paged_attention(strided_q, key_cache, value_cache, block_tables, seq_lens_t, cu, 0.125,
                        max(q_lens), max(seq_lens), out=out, num_splits=num_splits)
        torch.testing.assert_close(out[:num_tokens], ref, rtol=1e-5, atol=1e-5)
        assert out[num_tokens:].isnan().all()


def test_allocates_output_when_none_given():
    query, key_cache, value_cache, block_tables, seq_lens_t, cu = make_batch(
        [1, 3], [10, 3], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
        dtype=torch.float32, seed=4,
    )
    ref = paged_attention_ref(query, key_cache, value_cache, block_tables, seq_lens_t, cu, 0.1)
    out = paged_attention(query, key_cache, value_cache, block_tables, seq_lens_t, cu, 0.1, 3, 10)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [None, 3])
@pytest.mark.parametrize("mixed", [False, True])
def test_mixed_step_graph_padding(dtype, num_splits, mixed):
    """A mixed-step CUDA graph's launch: request rows past the real ones own no tokens (their
    cu_seqlens_q entries repeat the total), tokens past the real ones belong to no request,
    and the host bounds are the graph's (the token bucket, max_model_len). Real rows equal
    the reference; padding rows are never written."""
    q_lens, seq_lens = [1, 37, 1, 5], [33, 50, 16, 5]
    query, key_cache, value_cache, block_tables, seq_lens_t, cu = make_batch(
        q_lens, seq_lens, num_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
        dtype=dtype, seed=5,
    )
    num_tokens, bucket, rows = query.shape[0], query.shape[0] + 11, len(q_lens) + 5
    padded_query = torch.randn(bucket, 8, 64).to(dtype)
    padded_query[:num_tokens] = query
    padded_cu = torch.full((rows + 1,), num_tokens, dtype=torch.int32)
    padded_cu[: len(cu)] = cu
    padded_lens = torch.ones(rows, dtype=torch.int32)
    padded_lens[: len(seq_lens)] = seq_lens_t
    padded_tables = torch.full((rows, block_tables.shape[1]), int(block_tables[0, -1]),
                               dtype=torch.int32)
    padded_tables[: len(q_lens)] = block_tables
    ref = paged_attention_ref(query, key_cache, value_cache, block_tables, seq_lens_t, cu, 0.125)
    out = torch.full_like(padded_query, float("nan"))
    paged_attention(padded_query, key_cache, value_cache, padded_tables, padded_lens, padded_cu,
                    0.125, bucket, 4096, out=out, num_splits=num_splits, mixed=mixed)
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    err = ((out[:num_tokens].float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < bound, f"relative error {err:.2e}"
    assert out[num_tokens:].isnan().all()
