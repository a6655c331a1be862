"""RMSNorm, and residual-add fused with RMSNorm, with Hugging Face Llama semantics.

``y = weight * (x_fp32 * rsqrt(mean(x_fp32**2) + eps)).to(x.dtype)``. The fused form first
adds in the input dtype (``residual = x + residual``, as Hugging Face does) and normalises the
rounded sum; it updates ``residual`` in place.

The Triton kernel reads each row once (the whole row is one tile), so the fused form moves
4 rows of bytes per token (x, residual in; residual, y out) and the plain form 2. Narrow rows
(per-head q/k norms of 128) are packed several to a program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import next_power_of_2, row_major_last_dim


@triton.jit(do_not_specialize=["num_rows"])  # one variant for any token count
def _rms_norm_kernel(
    x_ptr,  # [num_rows, hidden], last dim contiguous
    residual_ptr,  # [num_rows, hidden], updated in place to x + residual (HAS_RESIDUAL)
    weight_ptr,  # [hidden]
    out_ptr,  # [num_rows, hidden]
    num_rows,
    stride_x,
    stride_r,
    stride_o,
    eps,
    HIDDEN: tl.constexpr,
    BLOCK_H: tl.constexpr,  # BLOCK_H: power of 2 >= HIDDEN
    ROWS: tl.constexpr,  # rows per program
    HAS_RESIDUAL: tl.constexpr,
):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    col_valid = cols < HIDDEN
    mask = (rows < num_rows)[:, None] & col_valid[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r_ptrs = residual_ptr + rows[:, None] * stride_r + cols[None, :]
        r = tl.load(r_ptrs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(residual_ptr.dtype.element_ty)
        tl.store(r_ptrs, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=1) / HIDDEN + eps)  # [ROWS]
    normed = (xf * inv_rms[:, None]).to(x.dtype).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)
    y = (normed * w[None, :]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], y, mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    lead, hidden = x.shape[:-1], x.shape[-1]
    x2 = row_major_last_dim(x.reshape(-1, hidden))
    num_rows = x2.shape[0]
    norm_dtype = residual.dtype if residual is not None else x.dtype
    out = torch.empty(
        (num_rows, hidden), dtype=torch.promote_types(weight.dtype, norm_dtype), device=x.device
    )
    if num_rows == 0:
        return out.view(*lead, hidden)
    r2 = x2 if residual is None else residual.view(-1, hidden)
    assert r2.stride(-1) == 1, "residual is updated in place: its last dim must be contiguous"
    block_h = next_power_of_2(hidden)
    rows = max(1, min(64, 2048 // block_h))  # about 2k elements a program at least
    _rms_norm_kernel[(triton.cdiv(num_rows, rows),)](
        x2,
        r2,
        weight,
        out,
        num_rows,
        x2.stride(0),
        r2.stride(0),
        out.stride(0),
        eps,
        HIDDEN=hidden,
        BLOCK_H=block_h,
        ROWS=rows,
        HAS_RESIDUAL=residual is not None,
        num_warps=max(1, min(16, rows * block_h // 512)),
    )
    return out.view(*lead, hidden)


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> torch.Tensor:
    """Triton RMSNorm; same contract as :func:`rms_norm_ref`."""
    return _launch(x, None, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    residual: torch.Tensor,  # [num_tokens, hidden], updated in place to x + residual
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> torch.Tensor:
    """Triton fused add + RMSNorm; same contract as :func:`fused_add_rms_norm_ref`."""
    return _launch(x, residual, weight, eps)


def rms_norm_ref(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> torch.Tensor:
    """Reference RMSNorm; returns a new tensor of ``x``'s dtype."""
    xf = x.float()
    variance = xf.pow(2).mean(dim=-1, keepdim=True)
    return weight * (xf * torch.rsqrt(variance + eps)).to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor,  # [num_tokens, hidden]
    residual: torch.Tensor,  # [num_tokens, hidden], updated in place to x + residual
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> torch.Tensor:
    """Reference: ``residual += x`` in place, then return ``rms_norm(residual)``."""
    residual.add_(x)
    return rms_norm_ref(residual, weight, eps)
