"""Small-batch fp8 matmul: ``y = (x_scale * w_scale^T) * (x_fp8 @ w_fp8^T)`` for few rows.

At decode batch sizes the weight read is the whole cost (a 4096 x 4096 e4m3 weight is 16 MiB,
the activations a few KiB), and a library GEMM tiled for large M leaves most of the memory
bandwidth unused. This kernel streams the weight once, in ``[BLOCK_N, BLOCK_K]`` tiles of
``BLOCK_K`` bytes per row, pipelined ``NUM_STAGES`` deep.

- Operands: ``x`` ``[M, K]`` and ``weight`` ``[N, K]`` (the engine's row-major layout), both
  e4m3 with the reduction dim contiguous; per-row scales ``x_scale [M, 1]`` and
  ``weight_scale [N]`` fp32. Any ``1 <= M <= SMALL_M_MAX``, any ``N`` and ``K``.
- Product, "swap AB": each program computes ``acc[BLOCK_N, BLOCK_M] = w_tile @ x_tile^T`` with
  ``tl.dot`` on the fp8 tiles, fp32 accumulation. The weight is the MMA's left operand, so its
  ``BLOCK_N`` rows fill Hopper's 64-row warpgroup MMA while the few token rows are the narrow
  side (``BLOCK_M = 16``); both operands are K-major in memory, the layout fp8 MMAs take.
- Grid ``(cdiv(N, BLOCK_N), split_k)``: when the column tiles alone give under
  ``PROGRAMS_PER_SM`` programs per SM (N = 4096 on 132 SMs), K is split into ``split_k``
  chunks of whole ``BLOCK_K`` tiles. Split programs write fp32 partials ``[split_k, M, N]``
  and a second kernel sums them in split order: deterministic, no atomics.
- Scales multiply once, after the sum: ``y[m, n] = acc[m, n] * x_scale[m] * w_scale[n]``.
- Compiled variants depend on ``(N, K)``'s tile plan and the output dtype only: ``M`` is a
  runtime value (not specialized), so every batch size up to ``SMALL_M_MAX`` shares one.
- CUDA-graph safe: the launch depends on shapes and the device's SM count only, no host syncs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .fp8_quant import FP8_DTYPE
from .utils import cdiv, next_power_of_2, num_sms

#: Largest row count the small-M kernel takes (its one M tile); larger batches use a GEMM.
SMALL_M_MAX = 16
#: Output columns (weight rows) per program: the 64 rows of one warpgroup MMA.
BLOCK_N = 64
#: Widest K tile: 256 e4m3 bytes per weight row per load.
MAX_BLOCK_K = 256
#: Narrowest K tile: the fp8 MMA's K step.
MIN_BLOCK_K = 32
#: K tiles in flight per program (software pipelining of the weight stream).
NUM_STAGES = 4
NUM_WARPS = 4
#: Programs per SM the split-K rule aims for, so every SM keeps loads in flight.
PROGRAMS_PER_SM = 2
#: A split chunk holds at least this many K tiles, so each program's pipeline has work.
MIN_K_TILES_PER_SPLIT = 4
#: Bound on the K split (and so on the fp32 partial buffer, ``split_k * M * N``).
MAX_SPLIT_K = 16
#: Columns per program of the partial-sum kernel.
SUM_BLOCK_N = 256

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class GemmPlan(NamedTuple):
    """Tile sizes and K split for one ``(N, K)`` weight shape (independent of M)."""

    block_k: int
    split_k: int  # >= 1; every split holds at least one K tile
    k_per_split: int  # a multiple of block_k


def plan_fp8_gemm(n: int, k: int, sms: int) -> GemmPlan:
    """The launch plan for an ``[N, K]`` weight on a device with ``sms`` SMs: split K only
    while the column tiles give under ``PROGRAMS_PER_SM`` programs per SM, never into chunks
    of fewer than ``MIN_K_TILES_PER_SPLIT`` tiles, nor into more than ``MAX_SPLIT_K``."""
    block_k = max(MIN_BLOCK_K, min(MAX_BLOCK_K, next_power_of_2(k)))
    k_tiles = cdiv(k, block_k)
    wanted = cdiv(PROGRAMS_PER_SM * sms, cdiv(n, BLOCK_N))
    split_k = max(1, min(wanted, k_tiles // MIN_K_TILES_PER_SPLIT, MAX_SPLIT_K))
    tiles_per_split = cdiv(k_tiles, split_k)
    return GemmPlan(block_k, cdiv(k_tiles, tiles_per_split), tiles_per_split * block_k)


@triton.jit(do_not_specialize=["M"])
def _fp8_gemm_small_m_kernel(
    x_ptr,  # [M, K] float8_e4m3fn, row stride stride_xm, last dim contiguous
    x_scale_ptr,  # [M, 1] fp32, row stride stride_xs (0 for a broadcast static scale)
    w_ptr,  # [N, K] float8_e4m3fn, contiguous
    w_scale_ptr,  # [N] fp32
    out_ptr,  # SPLIT_K == 1: y [M, N] contiguous, out dtype; else partials [SPLIT_K, M, N] fp32
    M,  # 1 <= M <= BLOCK_M
    N,
    K,
    stride_xm,
    stride_xs,
    k_per_split,  # K elements per split, a multiple of BLOCK_K
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K masks
    SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_valid = offs_n < N
    m_valid = offs_m < M
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * K + (k_start + offs_k)[None, :]
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + (k_start + offs_k)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, mask=n_valid[:, None], other=0.0)
            x = tl.load(x_ptrs, mask=m_valid[:, None], other=0.0)
        else:
            k_valid = (k + offs_k) < K
            w = tl.load(w_ptrs, mask=n_valid[:, None] & k_valid[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=m_valid[:, None] & k_valid[None, :], other=0.0)
        acc = tl.dot(w, tl.trans(x), acc)  # [BLOCK_N, BLOCK_K] @ [BLOCK_K, BLOCK_M]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    mask = n_valid[:, None] & m_valid[None, :]
    if SPLIT_K == 1:
        x_scale = tl.load(x_scale_ptr + offs_m * stride_xs, mask=m_valid, other=0.0)
        w_scale = tl.load(w_scale_ptr + offs_n, mask=n_valid, other=0.0)
        y = acc * x_scale[None, :] * w_scale[:, None]
        y_ptrs = out_ptr + offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
        tl.store(y_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        rows = (pid_k * M + offs_m).to(tl.int64)
        tl.store(out_ptr + rows[None, :] * N + offs_n[:, None], acc, mask=mask)


@triton.jit(do_not_specialize=["M"])
def _sum_splits_kernel(
    partial_ptr,  # [SPLIT_K, M, N] fp32, contiguous
    x_scale_ptr,  # [M, 1] fp32, row stride stride_xs
    w_scale_ptr,  # [N] fp32
    out_ptr,  # [M, N] out dtype, contiguous
    M,
    N,
    stride_xs,
    SPLIT_K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    n_valid = offs_n < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):  # fixed order: the sum is deterministic
        offs = (split * M + row).to(tl.int64) * N + offs_n
        acc += tl.load(partial_ptr + offs, mask=n_valid, other=0.0)
    x_scale = tl.load(x_scale_ptr + row * stride_xs)
    w_scale = tl.load(w_scale_ptr + offs_n, mask=n_valid, other=0.0)
    y = acc * x_scale * w_scale
    tl.store(out_ptr + row.to(tl.int64) * N + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_valid)


def _check(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    out_dtype: torch.dtype,
    max_rows: int,
) -> None:
    """ValueError unless the operands match the contract in the module docstring, with at
    most ``max_rows`` rows (at least one)."""
    if x_fp8.dim() != 2 or weight.dim() != 2 or x_fp8.shape[1] != weight.shape[1]:
        raise ValueError(
            f"fp8 gemm takes x [M, K] and weight [N, K], got {x_fp8.shape}, {weight.shape}"
        )
    if x_fp8.dtype != FP8_DTYPE or weight.dtype != FP8_DTYPE:
        raise ValueError(f"fp8 gemm takes e4m3 operands, got {x_fp8.dtype}, {weight.dtype}")
    rows, out_features = x_fp8.shape[0], weight.shape[0]
    if not 1 <= rows <= max_rows:
        raise ValueError(f"this fp8 gemm takes 1..{max_rows} rows, got {rows}")
    if x_scale.shape != (rows, 1) or weight_scale.shape != (out_features,):
        raise ValueError(
            f"fp8 gemm takes scales [M, 1] and [N], got {tuple(x_scale.shape)}, "
            f"{tuple(weight_scale.shape)}"
        )
    if x_scale.dtype != torch.float32 or weight_scale.dtype != torch.float32:
        raise ValueError(f"fp8 gemm scales are fp32, got {x_scale.dtype}, {weight_scale.dtype}")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"fp8 gemm writes bf16, fp16 or fp32, not {out_dtype}")


def fp8_gemm_small_m(
    x_fp8: torch.Tensor,  # [M, K] float8_e4m3fn, last dim contiguous, 1 <= M <= SMALL_M_MAX
    x_scale: torch.Tensor,  # [M, 1] fp32
    weight: torch.Tensor,  # [N, K] float8_e4m3fn, contiguous
    weight_scale: torch.Tensor,  # [N] fp32
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Triton small-M fp8 matmul; same contract as :func:`fp8_gemm_small_m_ref`."""
    _check(x_fp8, x_scale, weight, weight_scale, out_dtype, SMALL_M_MAX)
    if not weight.is_contiguous():
        raise ValueError("the fp8 gemm streams the weight row-major: pass it contiguous")
    if x_fp8.stride(1) != 1:
        x_fp8 = x_fp8.contiguous()
    weight_scale = weight_scale.contiguous()
    (M, K), N = x_fp8.shape, weight.shape[0]
    plan = plan_fp8_gemm(N, K, num_sms(weight.device))
    y = torch.empty((M, N), dtype=out_dtype, device=weight.device)
    out = y
    if plan.split_k > 1:
        out = torch.empty((plan.split_k, M, N), dtype=torch.float32, device=weight.device)
    _fp8_gemm_small_m_kernel[(cdiv(N, BLOCK_N), plan.split_k)](
        x_fp8, x_scale, weight, weight_scale, out, M, N, K,
        x_fp8.stride(0), x_scale.stride(0), plan.k_per_split,
        BLOCK_M=SMALL_M_MAX, BLOCK_N=BLOCK_N, BLOCK_K=plan.block_k,
        EVEN_K=K % plan.block_k == 0, SPLIT_K=plan.split_k,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    if plan.split_k > 1:
        _sum_splits_kernel[(M, cdiv(N, SUM_BLOCK_N))](
            out, x_scale, weight_scale, y, M, N, x_scale.stride(0),
            SPLIT_K=plan.split_k, BLOCK=SUM_BLOCK_N, num_warps=2,
        )  # fmt: skip
    return y


def fp8_gemm_small_m_ref(
    x_fp8: torch.Tensor,  # [M, K] float8_e4m3fn
    x_scale: torch.Tensor,  # [M, 1] fp32
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale: torch.Tensor,  # [N] fp32
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Reference: ``y[m, n] = x_scale[m] * weight_scale[n] * sum_k x[m, k] * w[n, k]``, both
    operands dequantized and multiplied in fp32, then cast to ``out_dtype`` (``[M, N]``).
    Takes any number of rows, not only the kernel's ``SMALL_M_MAX``."""
    _check(x_fp8, x_scale, weight, weight_scale, out_dtype, x_fp8.shape[0] or 1)
    x = x_fp8.float() * x_scale
    w = weight.float() * weight_scale[:, None]
    return (x @ w.t()).to(out_dtype)
