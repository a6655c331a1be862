"""FP8 (e4m3) quantization of activations for fp8 matmuls, and the one home of fp8 constants.

Format: ``torch.float8_e4m3fn`` (Triton ``tl.float8e4nv``), finite range ``[-448, 448]``, no
infinities. A scale maps fp8 codes back to real values: ``real ~= fp8.float() * scale``, so
quantizing divides by the scale, clamps to ``[-FP8_MAX, FP8_MAX]`` and rounds to nearest even
(torch's ``.to(torch.float8_e4m3fn)``). The clamp matters: torch turns an out-of-range value
into NaN, not into the largest finite code. Every kernel here divides with IEEE rounding
(``div_rn``; Triton's plain ``/`` is approximate on the GPU), so kernel and reference agree
bit for bit.

- :func:`per_token_quant_fp8`: one scale per row, ``max(amax|x_m| / FP8_MAX, MIN_SCALE)``.
  Grid: one program per row, two passes over the row in ``BLOCK`` tiles (amax, then quantize).
- :func:`static_quant_fp8`: one scale for the whole tensor, given (a checkpoint's input scale).
  Grid: (row, column tile).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import next_power_of_2, row_major_last_dim

FP8_DTYPE = torch.float8_e4m3fn
#: Largest finite e4m3 value (448).
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
#: Smallest per-token scale: a row of zeros (or of tiny values) must not give 0 / 0.
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)
#: Columns one program handles per step of its loop (per-token) or per program (static).
QUANT_BLOCK = 1024

_FP8_MAX = tl.constexpr(FP8_MAX)
_MIN_SCALE = tl.constexpr(MIN_SCALE)


@triton.jit
def quantize_fp8(x, scale):
    """``clamp(x / scale, ±FP8_MAX)`` rounded to e4m3; ``x`` and ``scale`` fp32 (``scale``
    broadcastable to ``x``), the division correctly rounded (IEEE), so it equals
    ``(x.float() / scale).clamp(...).to(fp8)``."""
    y = tl.math.div_rn(x, tl.broadcast_to(scale, x.shape))
    # NaN stays NaN (as torch's cast): the default clamp would turn it into -448. The enum
    # is spelled out in each call: compiled Triton cannot bind it to a local variable.
    y = tl.maximum(y, -_FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    y = tl.minimum(y, _FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    return y.to(tl.float8e4nv)


@triton.jit
def per_token_scale(amax):
    """``max(amax / FP8_MAX, MIN_SCALE)`` for an fp32 row amax, the division correctly rounded
    (as the reference's; torch on CUDA divides by a Python number through its reciprocal)."""
    return tl.maximum(tl.math.div_rn(amax, _FP8_MAX), _MIN_SCALE, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _per_token_quant_kernel(
    x_ptr,  # [M, K], last dim contiguous
    out_ptr,  # [M, K] float8_e4m3fn, contiguous
    scale_ptr,  # [M] fp32
    K,
    stride_x_row,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x_row
    out_row = out_ptr + row * K
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, K, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x), propagate_nan=tl.PropagateNan.ALL)
    scale = per_token_scale(tl.max(amax, 0))
    tl.store(scale_ptr + row, scale)
    for start in range(0, K, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        tl.store(out_row + cols, quantize_fp8(x, scale), mask=cols < K)


@triton.jit
def _static_quant_kernel(
    x_ptr,  # [M, K], last dim contiguous
    out_ptr,  # [M, K] float8_e4m3fn, contiguous
    scale_ptr,  # [1] fp32
    K,
    stride_x_row,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    scale = tl.load(scale_ptr)
    x = tl.load(x_ptr + row * stride_x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * K + cols, quantize_fp8(x, scale), mask=cols < K)


def _check_input(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"fp8 quantization takes [M, K] bf16/fp16/fp32, got {x.dtype} {x.shape}")
    return row_major_last_dim(x)


def per_token_quant_fp8(
    x: torch.Tensor,  # [M, K] bf16 / fp16 / fp32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton per-token quantization; same contract as :func:`per_token_quant_fp8_ref`."""
    x = _check_input(x)
    M, K = x.shape
    out = torch.empty((M, K), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if M == 0 or K == 0:
        return out, scale.fill_(MIN_SCALE)
    block = min(next_power_of_2(K), QUANT_BLOCK)
    _per_token_quant_kernel[(M,)](
        x, out, scale, K, x.stride(0), BLOCK=block, num_warps=max(1, min(4, block // 256))
    )
    return out, scale


def per_token_quant_fp8_ref(
    x: torch.Tensor,  # [M, K] bf16 / fp16 / fp32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: ``scale[m] = max(amax|x[m]| / FP8_MAX, MIN_SCALE)`` (``[M, 1]`` fp32) and
    ``x_fp8 = clamp(x / scale, ±FP8_MAX)`` in e4m3 (``[M, K]``); ``x ~= x_fp8 * scale``."""
    x = _check_input(x).float()
    if x.shape[1] == 0:
        return x.to(FP8_DTYPE), torch.full((x.shape[0], 1), MIN_SCALE, device=x.device)
    amax = x.abs().amax(dim=1, keepdim=True)
    # A tensor divisor: torch on CUDA turns division by a Python number into multiplication
    # by its reciprocal, which is not the correctly rounded quotient the kernel computes.
    scale = (amax / torch.full_like(amax, FP8_MAX)).clamp_min(MIN_SCALE)
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def static_quant_fp8(
    x: torch.Tensor,  # [M, K] bf16 / fp16 / fp32
    scale: torch.Tensor,  # [1] fp32, > 0
) -> torch.Tensor:
    """Triton static quantization; same contract as :func:`static_quant_fp8_ref`."""
    x = _check_input(x)
    assert scale.dtype == torch.float32 and scale.numel() == 1
    M, K = x.shape
    out = torch.empty((M, K), dtype=FP8_DTYPE, device=x.device)
    if M == 0 or K == 0:
        return out
    block = min(next_power_of_2(K), QUANT_BLOCK)
    _static_quant_kernel[(M, triton.cdiv(K, block))](
        x, out, scale, K, x.stride(0), BLOCK=block, num_warps=max(1, min(4, block // 256))
    )
    return out


def static_quant_fp8_ref(
    x: torch.Tensor,  # [M, K] bf16 / fp16 / fp32
    scale: torch.Tensor,  # [1] fp32, > 0
) -> torch.Tensor:
    """Reference: ``clamp(x / scale, ±FP8_MAX)`` in e4m3 (``[M, K]``), one scale for all."""
    x = _check_input(x).float()
    return (x / scale.reshape(1, 1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
