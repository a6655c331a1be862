"""Merge split-KV partials of paged attention into the final output.

Each (token, head) row of a split launch leaves ``num_splits`` partial results, each the
softmax-weighted mean over one partition of the context (fp32) with its log-sum-exp in base 2
(``-inf`` for a partition the row sees no key of). The merge rescales them by
``2**(lse_s - max_s lse_s)`` and divides by the sum of the weights.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import next_power_of_2


@triton.jit(do_not_specialize=["num_seqs", "num_splits"])
def _merge_splits_kernel(
    split_out_ptr,  # [num_tokens, num_heads, num_splits, HEAD_DIM] fp32, contiguous
    split_lse_ptr,  # [num_tokens, num_heads, num_splits] fp32, contiguous
    out_ptr,  # [num_tokens, num_heads, HEAD_DIM]
    cu_seqlens_q_ptr,  # [num_seqs + 1] int32: tokens at or past cu_seqlens_q[num_seqs] are padding
    num_seqs,
    num_splits,  # <= BLOCK_S
    stride_o_tok, stride_o_head,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    if token >= tl.load(cu_seqlens_q_ptr + num_seqs):
        return  # padding token: no split wrote its partials
    row = token.to(tl.int64) * tl.num_programs(1) + head
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_valid = offs_s < num_splits
    lse = tl.load(split_lse_ptr + row * num_splits + offs_s, mask=s_valid, other=float("-inf"))
    lse_max = tl.max(lse, 0)  # finite: split 0 always holds key 0, which every row sees
    weight = tl.exp2(lse - lse_max)  # [BLOCK_S]; 0 for empty splits
    parts = tl.load(
        split_out_ptr + (row * num_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
        mask=s_valid[:, None] & (offs_d < HEAD_DIM)[None, :],
        other=0.0,
    )  # [BLOCK_S, BLOCK_D]
    result = tl.sum(parts * weight[:, None], 0) / tl.sum(weight, 0)
    o_ptrs = out_ptr + token.to(tl.int64) * stride_o_tok + head * stride_o_head + offs_d
    tl.store(o_ptrs, result.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


def merge_splits(
    split_out: torch.Tensor,  # [num_tokens, num_heads, num_splits, head_dim] fp32
    split_lse: torch.Tensor,  # [num_tokens, num_heads, num_splits] fp32
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim], last dim contiguous
    cu_seqlens_q: torch.Tensor,  # [num_seqs + 1] int32
    num_seqs: int,
) -> None:
    num_tokens, num_heads, num_splits, head_dim = split_out.shape
    block_s = next_power_of_2(num_splits)  # the only size that selects a compiled variant
    _merge_splits_kernel[(num_tokens, num_heads)](
        split_out, split_lse, out, cu_seqlens_q, num_seqs, num_splits,
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=next_power_of_2(head_dim), BLOCK_S=block_s,
        num_warps=4 if head_dim * block_s >= 2048 else 2,
    )
