"""Paged attention over a flattened varlen batch that mixes prefill chunks and decodes.

Inputs (the engine's attention metadata):
- ``query`` ``[num_tokens, num_heads, head_dim]``: the step's queries, request after request;
  request ``b`` owns rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``.
- ``seq_lens[b]``: the request's context length *after* this step (cached tokens plus the
  new ones). Its new tokens sit at absolute positions ``seq_lens[b] - q_len_b ... seq_lens[b]-1``
  and attend causally: query at position ``p`` sees keys ``0..p``.
- ``block_tables[b, i]``: physical block holding the request's tokens
  ``i*block_size .. (i+1)*block_size-1``; entries past the context are ignored.
- Caches in the layout of :mod:`metroline.kernels.kv_cache`; the step's new K/V are already
  written there. GQA: query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)``.

The Triton kernel: one program per (query tile, KV head, KV split). A query tile holds
``BLOCK_Q`` consecutive tokens of one request times the ``GROUP`` query heads that share the
KV head, flattened token-major into ``BLOCK_M = BLOCK_Q * GROUP`` (padded) rows, so each K/V
tile is read once for the whole group. Keys are visited in ``BLOCK_N`` tiles gathered row by row
through the block table: first the tiles every row of the query tile may see (no masks), then
the tiles along the causal diagonal (masked). Softmax is online, in fp32, base 2.
When the grid is too small to fill the GPU (decode of few requests with long contexts), each
request's context is cut into ``num_splits`` partitions computed by separate programs and
merged by :mod:`metroline.kernels.split_kv`. A step that mixes prompt chunks with decodes can
run as two launches (``mixed``), each keeping only its own requests (runtime ``row_filter``):
chunks in the chunk tile shape, one-token requests in the decode one. Launch sizes that
change every step (requests, splits, the filter) are runtime arguments, never specialised on:
the compiled variants are fixed by the tile shape alone, so serving compiles nothing new once
:mod:`metroline.kernels.warmup` ran.
FP8 caches (:mod:`metroline.kernels.kv_cache`, constexpr ``FP8``): ``k_scale`` folds into the
softmax scale, ``v_scale`` scales each program's result (split partials too: the merge is linear).
K/V widen in registers to fp16 for 16-bit queries (exact and cheap; a bf16 query is clamped to
+-65504 once per program), to fp32 for fp32 ones; tiles and output follow the query's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_tiles import (
    AttentionConfig,
    attention_config,
    choose_num_splits,
    decode_has_few_programs,
)
from .kv_cache import is_fp8_kv
from .paged_attention_ref import paged_attention_ref
from .split_kv import merge_splits
from .utils import cdiv, dot_precision, next_power_of_2, num_sms, row_major_last_dim

__all__ = ["ROWS_ALL", "ROWS_MANY", "ROWS_ONE", "paged_attention", "paged_attention_ref"]

LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(
    acc, l_i, m_i,  # [BLOCK_M, BLOCK_D] fp32, [BLOCK_M] fp32, [BLOCK_M] fp32 (base-2 max)
    q,  # [BLOCK_M, BLOCK_D] in the dot dtype: the cache's; for fp8 caches fp16 or fp32
    q_pos,  # [BLOCK_M] int32: absolute position of each row (padding rows clamped)
    start, kv_hi,  # first key of this tile; keys >= kv_hi are outside the program's range
    block_table_ptr,  # [max_blocks] int32: this request's row of the block table
    key_ptr, value_ptr,  # cache base pointers, already offset to this KV head
    stride_cache_block, stride_cache_row,
    scale_log2,  # softmax scale * log2(e), > 0
    offs_d,  # [BLOCK_D]
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One step of online softmax over keys ``start .. start+BLOCK_N-1``. Unmasked tiles lie
    wholly inside the context every row sees, so they skip all bounds checks."""
    offs_n = start + tl.arange(0, BLOCK_N)
    d_valid = offs_d < HEAD_DIM
    if MASKED:
        n_valid = offs_n < kv_hi
        block = tl.load(block_table_ptr + offs_n // BLOCK_SIZE, mask=n_valid, other=0)
        kv_mask = n_valid[:, None] & d_valid[None, :]
    else:
        block = tl.load(block_table_ptr + offs_n // BLOCK_SIZE)
        kv_mask = d_valid[None, :]
    # int64: block * stride can pass 2**31 elements in a large pool.
    rows = block.to(tl.int64) * stride_cache_block + (offs_n % BLOCK_SIZE) * stride_cache_row
    kv_offs = rows[:, None] + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
    k = tl.load(key_ptr + kv_offs, mask=kv_mask, other=0.0).to(q.dtype)  # a no-op unless FP8
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N] fp32
    if MASKED:
        visible = (offs_n[None, :] <= q_pos[:, None]) & n_valid[None, :]
        s = tl.where(visible, s, float("-inf"))
    # Scores stay unscaled; the scale folds into the exp2 argument (one FMA per score).
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
    if MASKED:  # a row may see no key of this tile: keep exp2 away from (-inf) - (-inf)
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new_safe = m_new
    p = tl.exp2(s * scale_log2 - m_new_safe[:, None])
    alpha = tl.exp2(m_i - m_new_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(value_ptr + kv_offs, mask=kv_mask, other=0.0).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


# Sizes that change from step to step (the block table's width included) are plain runtime
# values: Triton would otherwise compile a variant for each of "equals 1", "divisible by 16"
# and neither, mid-serving.
_STEP_SIZES = [
    "num_seqs", "tiles_per_seq", "num_splits", "stride_bt_seq", "row_filter", "ordered",
]  # fmt: skip


@triton.jit(do_not_specialize=_STEP_SIZES)
def _paged_attention_kernel(
    query_ptr,  # [num_tokens, num_heads, head_dim]
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks] int32
    seq_lens_ptr,  # [num_seqs] int32
    cu_seqlens_q_ptr,  # [num_seqs + 1] int32
    seq_order_ptr,  # [num_seqs] int32 (ordered): a dense grid's requests, in launch order
    out_ptr,  # [num_tokens, num_heads, head_dim] (not SPLIT)
    split_out_ptr,  # [num_tokens, num_heads, num_splits, head_dim] fp32 (SPLIT)
    split_lse_ptr,  # [num_tokens, num_heads, num_splits] fp32, base-2 (SPLIT)
    k_scale_ptr, v_scale_ptr,  # [num_kv_heads] fp32 (FP8)
    scale_log2,  # softmax scale * log2(e)
    num_seqs,
    tiles_per_seq,  # SEARCH=False: query tiles per request (grid axis 0 = num_seqs * this)
    num_splits,  # partitions of each context (grid axis 2); 1 unless SPLIT
    row_filter,  # 0 every request, 1 those of one query token, 2 those of more (ROWS_*)
    ordered,  # 1: a dense grid's row b attends request seq_order[b]
    stride_q_tok, stride_q_head,
    stride_o_tok, stride_o_head,
    stride_cache_block, stride_cache_row, stride_cache_head,
    stride_bt_seq,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,  # BLOCK_D = next power of 2 >= HEAD_DIM
    BLOCK_SIZE: tl.constexpr,  # KV-cache block size (tokens per page)
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,  # num_splits > 1: write partials for the merge kernel
    SEARCH: tl.constexpr,  # map grid axis 0 to (request, tile) by binary search of cu_seqlens_q
    DOT_PRECISION: tl.constexpr,
    FP8: tl.constexpr,  # the caches are float8_e4m3fn, dequantized by k_scale / v_scale
):
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    if SEARCH:
        # Programs run from the end: the last request's last tiles, which see the most keys,
        # start first (the bound's spare tiles exit at once wherever they fall).
        tile = tl.num_programs(0) - 1 - tl.program_id(0)
        # Request b owns tiles [cu_q[b] // BLOCK_Q + b, cu_q[b+1] // BLOCK_Q + b + 1): a
        # monotone upper bound on the tiles before it, computable without a host sync.
        lo = tile * 0
        hi = lo + num_seqs
        while lo + 1 < hi:
            mid = (lo + hi) // 2
            first = tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid
            lo = tl.where(first <= tile, mid, lo)
            hi = tl.where(first <= tile, hi, mid)
        seq = lo
        local_tile = tile - (tl.load(cu_seqlens_q_ptr + seq) // BLOCK_Q + seq)
    else:
        tile = tl.program_id(0)
        seq = tile // tiles_per_seq
        if ordered != 0:  # longest contexts first: the last wave holds the short programs
            seq = tl.load(seq_order_ptr + seq)
        # Last tiles first: they see the most keys, so the long programs start early.
        local_tile = tiles_per_seq - 1 - tile % tiles_per_seq

    # All three loads issue before the exit test: one memory round trip, not two, before the
    # block table and then K/V can be fetched (this latency chain bounds small decodes, which
    # are few programs, so never ``ordered``: that adds the order's load before these).
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_end = tl.load(cu_seqlens_q_ptr + seq + 1)
    seq_len = tl.load(seq_lens_ptr + seq)
    q_len = q_end - q_start
    if local_tile * BLOCK_Q >= q_len:
        return
    if ((row_filter == 1) & (q_len != 1)) | ((row_filter == 2) & (q_len == 1)):
        return  # another launch of this step attends this request
    first_pos = seq_len - q_len  # absolute position of the request's first query token

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_tok = local_tile * BLOCK_Q + offs_m // GROUP  # token index within the request
    row_head = kv_head * GROUP + offs_m % GROUP
    row_valid = (offs_m < BLOCK_Q * GROUP) & (row_tok < q_len)
    last_tok = tl.minimum(local_tile * BLOCK_Q + BLOCK_Q, q_len) - 1
    q_pos = first_pos + tl.minimum(row_tok, last_tok)  # padding rows act as the last token
    pos_lo = first_pos + local_tile * BLOCK_Q
    pos_hi = first_pos + last_tok

    q_rows = (q_start + row_tok).to(tl.int64) * stride_q_tok + row_head * stride_q_head
    io_mask = row_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(query_ptr + q_rows[:, None] + offs_d[None, :], mask=io_mask, other=0.0)
    if FP8:  # scores of dequantized keys: q . (k * k_scale) = (q . k) * k_scale
        scale_log2 = scale_log2 * tl.load(k_scale_ptr + kv_head)
        if q.dtype == tl.bfloat16:  # both dots then run in fp16, which fp8 widens to exactly
            q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)

    # Keys this program covers: its split's part of [0, pos_hi], cut at the causal diagonal.
    if not SPLIT:
        kv_lo = 0
        kv_hi = pos_hi + 1
    else:
        part = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
        kv_lo = split * part
        kv_hi = tl.minimum(kv_lo + part, pos_hi + 1)
    full_hi = tl.minimum(kv_hi, pos_lo + 1)  # every row sees keys < full_hi
    full_end = kv_lo + tl.maximum(full_hi - kv_lo, 0) // BLOCK_N * BLOCK_N

    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    head_offset = kv_head.to(tl.int64) * stride_cache_head
    key_ptr = key_cache_ptr + head_offset
    value_ptr = value_cache_ptr + head_offset

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    for start in range(kv_lo, full_end, BLOCK_N):
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, q_pos, start, kv_hi, block_table_ptr, key_ptr, value_ptr,
            stride_cache_block, stride_cache_row, scale_log2, offs_d,
            HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION,
        )
    for start in range(full_end, kv_hi, BLOCK_N):
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, q_pos, start, kv_hi, block_table_ptr, key_ptr, value_ptr,
            stride_cache_block, stride_cache_row, scale_log2, offs_d,
            HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION,
        )

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only an empty split has l == 0
    result = acc / l_safe[:, None]
    if FP8:
        result = result * tl.load(v_scale_ptr + kv_head)
    if not SPLIT:
        o_rows = (q_start + row_tok).to(tl.int64) * stride_o_tok + row_head * stride_o_head
        o_ptrs = out_ptr + o_rows[:, None] + offs_d[None, :]
        tl.store(o_ptrs, result.to(out_ptr.dtype.element_ty), mask=io_mask)
    else:
        # Split partials are contiguous: row (token, head) then split.
        slot = ((q_start + row_tok).to(tl.int64) * (GROUP * tl.num_programs(1)) + row_head)
        slot = slot * num_splits + split
        tl.store(split_out_ptr + slot[:, None] * HEAD_DIM + offs_d[None, :], result, mask=io_mask)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        tl.store(split_lse_ptr + slot, lse, mask=row_valid)


#: ``row_filter`` values: which requests a launch attends.
ROWS_ALL, ROWS_ONE, ROWS_MANY = 0, 1, 2


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    cu_seqlens_q: torch.Tensor,  # [num_seqs + 1] int32
    scale: float,
    max_seqlen_q: int,  # host upper bound of the query lengths (exact is best)
    max_seqlen_k: int,  # host upper bound of seq_lens (steers the split choice only)
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
    *,
    mixed: bool = False,  # one-token requests may sit beside longer ones (see below)
    num_splits: int | None = None,  # override the split rule (tests, benchmarks)
    config: AttentionConfig | None = None,  # override the tile rules (benchmarks)
    k_scale: torch.Tensor | None = None,  # [num_kv_heads] fp32, fp8 caches only
    v_scale: torch.Tensor | None = None,  # [num_kv_heads] fp32, fp8 caches only
    seq_order: torch.Tensor | None = None,  # [num_seqs] int32, longest context first
) -> torch.Tensor:
    """Triton paged attention; same contract as :func:`paged_attention_ref`. No host sync:
    launch shapes come from tensor shapes and the two host-side maxima.

    One launch takes one tile shape, sized by ``max_seqlen_q``: in a step that mixes prompt
    chunks with decodes, a decode's one token would fill a chunk-sized tile alone. With
    ``mixed`` (and ``max_seqlen_q > 1``) the requests of more than one token run first in
    their tile shape, then the one-token requests in the decode shape, unsplit; the first
    launch's split merge may write one-token rows, which the second then overwrites. When
    the split rule would split the one-token launch (few requests, long contexts), the step
    keeps the single launch instead. Either way every request's rows end up written by the
    launch that attends them.

    ``seq_order``, a permutation of the requests (longest context first), is the order in
    which one-token launches of many programs (not ``decode_has_few_programs``) take them:
    the long programs start in the first wave and the last wave holds short ones. Chunk
    launches order their tiles by position instead, and few programs fit one wave. Any
    permutation computes the same rows; one that is not a permutation is the caller's error,
    as a block table naming foreign blocks is."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    assert key_cache.is_contiguous() and value_cache.is_contiguous()
    assert num_heads % num_kv_heads == 0 and value_cache.shape == key_cache.shape
    if mixed and config is not None:
        raise ValueError("a tile override (config) takes one launch: not with mixed")
    group = num_heads // num_kv_heads
    num_seqs = seq_lens.shape[0]
    query = row_major_last_dim(query)
    fp8 = is_fp8_kv(key_cache, k_scale, v_scale)
    if query.dtype != key_cache.dtype and not fp8:
        query = query.to(key_cache.dtype)
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    assert out.stride(-1) == 1
    max_seqlen_q = max(1, max_seqlen_q)
    sms = num_sms(query.device)
    few = decode_has_few_programs(num_seqs * num_kv_heads, sms)
    cfg = config or attention_config(query.dtype, head_dim, group, max_seqlen_q, few, fp8)
    if seq_order is not None:
        assert seq_order.shape == (num_seqs,) and seq_order.dtype == torch.int32
    order = None if few else seq_order
    args = (query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, out,
            k_scale, v_scale, scale, max_seqlen_k, fp8, order)  # fmt: skip
    apart = mixed and max_seqlen_q > 1
    if apart:
        one = attention_config(query.dtype, head_dim, group, 1, few, fp8)
        # Few requests over long contexts want split-KV, which the one-token launch does
        # not take: the single launch (split as its own rule says) serves them better.
        if num_splits is None:
            work = num_seqs * num_kv_heads
            apart = choose_num_splits(work, max_seqlen_k, sms, one.block_n) == 1
    _launch(*args, cfg, max_seqlen_q, num_splits, ROWS_MANY if apart else ROWS_ALL)
    if apart:
        _launch(*args, one, 1, 1, ROWS_ONE)
    return out


def _launch(
    query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, out, k_scale, v_scale,
    scale: float, max_seqlen_k: int, fp8: bool, order: torch.Tensor | None,
    cfg: AttentionConfig, max_seqlen_q: int,
    num_splits: int | None, row_filter: int,
) -> None:  # fmt: skip
    """One kernel launch (and its split merge) over the requests ``row_filter`` keeps."""
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    num_seqs = seq_lens.shape[0]
    # Grid axis 0: dense (one tile per request) for decodes; for prompt chunks, a bound on the
    # tiles the requests need, mapped to requests by binary search. The choice depends on the
    # launch's tile shape alone, so it adds no compiled variant of its own.
    tiles_per_seq = cdiv(max_seqlen_q, cfg.block_q)
    search = max_seqlen_q > 1
    grid_tiles = num_tokens // cfg.block_q + num_seqs if search else num_seqs
    ordered = order is not None and not search
    if num_splits is None:
        sms = num_sms(query.device)
        num_splits = choose_num_splits(grid_tiles * num_kv_heads, max_seqlen_k, sms, cfg.block_n)
    if num_splits > 1:
        split_out = torch.empty(
            (num_tokens, num_heads, num_splits, head_dim), dtype=torch.float32, device=query.device
        )
        split_lse = torch.empty(
            (num_tokens, num_heads, num_splits), dtype=torch.float32, device=query.device
        )
    else:
        split_out = split_lse = out  # unused
    _paged_attention_kernel[(grid_tiles, num_kv_heads, num_splits)](
        query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q,
        order if ordered else seq_lens, out, split_out, split_lse,
        k_scale if fp8 else seq_lens, v_scale if fp8 else seq_lens,  # unused unless fp8
        scale * LOG2E, num_seqs, tiles_per_seq, num_splits, row_filter, int(ordered),
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_D=next_power_of_2(head_dim), BLOCK_SIZE=block_size, BLOCK_M=cfg.block_m,
        BLOCK_Q=cfg.block_q, BLOCK_N=cfg.block_n, SPLIT=num_splits > 1, SEARCH=search,
        DOT_PRECISION=dot_precision(query.dtype), FP8=fp8, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    if num_splits > 1:
        merge_splits(split_out, split_lse, out, cu_seqlens_q, num_seqs)
