"""RMSNorm, and residual-add fused with RMSNorm, with Hugging Face Llama semantics.

``y = weight * (x_fp32 * rsqrt(mean(x_fp32**2) + eps)).to(x.dtype)``. The fused form first
adds in the input dtype (``residual = x + residual``, as Hugging Face does) and normalises the
rounded sum; it updates ``residual`` in place.

The Triton kernel reads each row once (the whole row is one tile), so the fused form moves
4 rows of bytes per token (x, residual in; residual, y out) and the plain form 2. Narrow rows
(per-head q/k norms of 128) are packed several to a program.

The ``*_quant_fp8`` forms (for a projection with fp8 weights and per-token input scales) also
quantize the output in the same program, as :func:`~.fp8_quant.per_token_quant_fp8` would: the
value quantized is the unfused output exactly, rounded to its dtype (``promote(weight, x)``),
so ``rms_norm_quant_fp8(x, w, eps) == per_token_quant_fp8(rms_norm(x, w, eps))`` bit for bit
(codes and scales). They take ``[M, hidden]`` and return ``(x_fp8 [M, hidden], scale [M, 1])``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_quant import FP8_DTYPE, FP8_MAX, MIN_SCALE, per_token_quant_fp8_ref, quantize_fp8
from .utils import next_power_of_2, row_major_last_dim

_FP8_MAX = tl.constexpr(FP8_MAX)
_MIN_SCALE = tl.constexpr(MIN_SCALE)
#: The norm output dtypes the fp8 forms quantize, as Triton names them.
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit(do_not_specialize=["num_rows"])  # one variant for any token count
def _rms_norm_kernel(
    x_ptr,  # [num_rows, hidden], last dim contiguous
    residual_ptr,  # [num_rows, hidden], updated in place to x + residual (HAS_RESIDUAL)
    weight_ptr,  # [hidden]
    out_ptr,  # [num_rows, hidden]: the norm, or its e4m3 codes (QUANT)
    scale_ptr,  # [num_rows] fp32 per-token scales (QUANT)
    num_rows,
    stride_x,
    stride_r,
    stride_o,
    eps,
    HIDDEN: tl.constexpr,
    BLOCK_H: tl.constexpr,  # BLOCK_H: power of 2 >= HIDDEN
    ROWS: tl.constexpr,  # rows per program
    HAS_RESIDUAL: tl.constexpr,
    QUANT: tl.constexpr,
    Y_DTYPE: tl.constexpr,  # the norm's dtype before quantization (QUANT)
    Y_VEC: tl.constexpr,  # elements of Y_DTYPE in 16 bytes, at most BLOCK_H (QUANT)
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
    y = normed * w[None, :]
    if QUANT:  # quantize the unfused output: rounded to its dtype first
        y = y.to(Y_DTYPE).to(tl.float32)
        scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(y), axis=1), _FP8_MAX), _MIN_SCALE)
        tl.store(scale_ptr + rows, scale, mask=rows < num_rows)
        y = quantize_fp8(y, scale[:, None])
        # Store the codes in runs of Y_VEC, as the unfused kernel stores its output: Triton
        # then gives the row the unfused kernel's layout (16-code runs would change it), so the
        # sum of squares adds in the same order and the codes equal the unfused ones bit for
        # bit on the GPU too, fp32 rows included.
        cols = tl.max_contiguous(tl.arange(0, BLOCK_H), Y_VEC)
    tl.store(
        out_ptr + rows[:, None] * stride_o + cols[None, :],
        y.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def _output_dtype(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor):
    """The norm's dtype: the weight's and the normalised input's (the residual's when fused)."""
    norm_dtype = residual.dtype if residual is not None else x.dtype
    return torch.promote_types(weight.dtype, norm_dtype)


def _launch(
    x2: torch.Tensor,  # [num_rows, hidden], last dim contiguous
    residual: torch.Tensor | None,  # x2's shape, updated in place
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,  # [num_rows, hidden]: the norm's dtype, or fp8 (with scale)
    scale: torch.Tensor | None = None,  # [num_rows, 1] fp32: quantize the output per token
) -> None:
    num_rows, hidden = x2.shape
    if num_rows == 0:
        return
    r2 = x2 if residual is None else residual.view(-1, hidden)
    assert r2.stride(-1) == 1, "residual is updated in place: its last dim must be contiguous"
    block_h = next_power_of_2(hidden)
    rows = max(1, min(64, 2048 // block_h))  # about 2k elements a program at least
    quant = scale is not None
    y_dtype = _output_dtype(x2, residual, weight)
    _rms_norm_kernel[(triton.cdiv(num_rows, rows),)](
        x2,
        r2,
        weight,
        out,
        scale,
        num_rows,
        x2.stride(0),
        r2.stride(0),
        out.stride(0),
        eps,
        HIDDEN=hidden,
        BLOCK_H=block_h,
        ROWS=rows,
        HAS_RESIDUAL=residual is not None,
        QUANT=quant,
        Y_DTYPE=_TL_DTYPES[y_dtype] if quant else None,
        Y_VEC=min(16 // y_dtype.itemsize, block_h) if quant else None,
        num_warps=max(1, min(16, rows * block_h // 512)),
    )


def _norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    lead, hidden = x.shape[:-1], x.shape[-1]
    x2 = row_major_last_dim(x.reshape(-1, hidden))
    dtype = _output_dtype(x, residual, weight)
    out = torch.empty((x2.shape[0], hidden), dtype=dtype, device=x.device)
    _launch(x2, residual, weight, eps, out)
    return out.view(*lead, hidden)


def _check_quant_input(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor):
    dtype = _output_dtype(x, residual, weight)
    if x.dim() != 2 or dtype not in _TL_DTYPES:
        raise ValueError(
            f"RMSNorm with fp8 output takes [M, hidden] rows normalised to bf16/fp16/fp32, "
            f"got {x.shape} normalised to {dtype}"
        )


def _norm_quant(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_quant_input(x, residual, weight)
    x2 = row_major_last_dim(x)
    out = torch.empty(x2.shape, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((x2.shape[0], 1), dtype=torch.float32, device=x.device)
    _launch(x2, residual, weight, eps, out, scale)
    return out, scale


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> torch.Tensor:
    """Triton RMSNorm; same contract as :func:`rms_norm_ref`."""
    return _norm(x, None, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    residual: torch.Tensor,  # [num_tokens, hidden], updated in place to x + residual
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> torch.Tensor:
    """Triton fused add + RMSNorm; same contract as :func:`fused_add_rms_norm_ref`."""
    return _norm(x, residual, weight, eps)


def rms_norm_quant_fp8(
    x: torch.Tensor,  # [M, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton RMSNorm with per-token fp8 output; same contract as
    :func:`rms_norm_quant_fp8_ref`, and equal bit for bit to ``rms_norm`` then
    ``per_token_quant_fp8``."""
    return _norm_quant(x, None, weight, eps)


def fused_add_rms_norm_quant_fp8(
    x: torch.Tensor,  # [M, hidden]
    residual: torch.Tensor,  # [M, hidden], updated in place to x + residual
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton fused add + RMSNorm with per-token fp8 output; same contract as
    :func:`fused_add_rms_norm_quant_fp8_ref`."""
    return _norm_quant(x, residual, weight, eps)


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


def rms_norm_quant_fp8_ref(
    x: torch.Tensor,  # [M, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: ``per_token_quant_fp8_ref(rms_norm_ref(x, weight, eps))``, i.e.
    ``(x_fp8 [M, hidden] e4m3, scale [M, 1] fp32)``."""
    _check_quant_input(x, None, weight)
    return per_token_quant_fp8_ref(rms_norm_ref(x, weight, eps))


def fused_add_rms_norm_quant_fp8_ref(
    x: torch.Tensor,  # [M, hidden]
    residual: torch.Tensor,  # [M, hidden], updated in place to x + residual
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: ``residual += x`` in place, then :func:`rms_norm_quant_fp8_ref` of it."""
    _check_quant_input(x, residual, weight)
    return per_token_quant_fp8_ref(fused_add_rms_norm_ref(x, residual, weight, eps))
