"""SiLU-and-mul: the gated MLP activation ``silu(gate) * up``.

The Triton kernel follows Hugging Face's rounding: ``silu(gate)`` is computed in fp32 and
rounded to the input dtype, then multiplied by ``up`` in fp32 and rounded again. Grid: one
program per (token, column tile).

:func:`silu_and_mul_quant_fp8` (for a down projection with fp8 weights and per-token input
scales) also quantizes the output as :func:`~.fp8_quant.per_token_quant_fp8` would: the value
quantized is the unfused output exactly (rounded to the input dtype), so it equals
``per_token_quant_fp8(silu_and_mul(x))`` bit for bit. Its grid is one program per token.
Batches of at least :data:`SILU_QUANT_ROW_MIN_TOKENS` tokens whose rows fit one tile
(``intermediate <= SILU_QUANT_ROW_MAX``) read each row once, whole, into registers: the amax
and the codes come from the same product, so the kernel moves the input once (the
bandwidth floor). Smaller batches, where latency rules, take two passes over the row in
tiles: the per-token amax, then the codes (the product recomputed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .fp8_quant import FP8_DTYPE, FP8_MAX, MIN_SCALE, per_token_quant_fp8_ref, quantize_fp8
from .utils import cdiv, next_power_of_2, row_major_last_dim

_FP8_MAX = tl.constexpr(FP8_MAX)
_MIN_SCALE = tl.constexpr(MIN_SCALE)
#: Columns of the output one program handles (plain kernel).
SILU_BLOCK = 2048
#: The fp8 kernel's tile per loop step: one program reads a whole row (twice), so wide tiles
#: and many warps keep enough loads in flight; a row takes about 8 tiles, 2048 to 4096 wide
#: (measured on an H200, decode batch 1: 6.3 us at I = 14336, 9.8 us at I = 28672).
SILU_QUANT_BLOCKS = (2048, 4096)
#: Widest row the one-pass kernel holds in registers (16 warps, 32 columns a thread).
SILU_QUANT_ROW_MAX = 16384
#: Fewest tokens for the one-pass kernel (prompt-sized batches, bound by bandwidth: the
#: two-pass kernel reads the input twice there).
SILU_QUANT_ROW_MIN_TOKENS = 64


@triton.jit
def _gated_tile(x_row, cols, intermediate, dtype: tl.constexpr):
    """``silu(gate) * up`` at output columns ``cols`` of one token (``x_row``: its gate,
    then its up), rounded to ``dtype`` as Hugging Face does; 0 where ``cols >= intermediate``."""
    mask = cols < intermediate
    gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + intermediate + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    return (silu * up).to(dtype)


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [num_tokens, 2 * intermediate]: gate then up, last dim contiguous
    out_ptr,  # [num_tokens, intermediate], last dim contiguous
    intermediate,
    stride_x,
    stride_o,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    y = _gated_tile(x_ptr + token * stride_x, cols, intermediate, out_ptr.dtype.element_ty)
    tl.store(out_ptr + token * stride_o + cols, y, mask=cols < intermediate)


@triton.jit
def _silu_and_mul_quant_kernel(
    x_ptr,  # [num_tokens, 2 * intermediate]: gate then up, last dim contiguous
    out_ptr,  # [num_tokens, intermediate] float8_e4m3fn, contiguous
    scale_ptr,  # [num_tokens] fp32
    intermediate,
    stride_x,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + token * stride_x
    dtype = x_ptr.dtype.element_ty  # the unfused output's dtype
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, intermediate, BLOCK):
        y = _gated_tile(x_row, start + tl.arange(0, BLOCK), intermediate, dtype)
        amax = tl.maximum(amax, tl.abs(y.to(tl.float32)), propagate_nan=tl.PropagateNan.ALL)
    scale = tl.maximum(tl.math.div_rn(tl.max(amax, 0), _FP8_MAX), _MIN_SCALE)
    tl.store(scale_ptr + token, scale)
    for start in range(0, intermediate, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        y = _gated_tile(x_row, cols, intermediate, dtype).to(tl.float32)
        tl.store(
            out_ptr + token * intermediate + cols, quantize_fp8(y, scale), mask=cols < intermediate
        )


@triton.jit
def _silu_and_mul_quant_row_kernel(
    x_ptr,  # [num_tokens, 2 * intermediate]: gate then up, last dim contiguous
    out_ptr,  # [num_tokens, intermediate] float8_e4m3fn, contiguous
    scale_ptr,  # [num_tokens] fp32
    intermediate,
    stride_x,
    BLOCK: tl.constexpr,  # >= intermediate: the whole row in one tile
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    y = _gated_tile(x_ptr + token * stride_x, cols, intermediate, x_ptr.dtype.element_ty)
    y = y.to(tl.float32)
    # As the two-pass kernel does (NaN propagates to the scale); columns past the row are 0.
    amax = tl.maximum(tl.zeros((BLOCK,), dtype=tl.float32), tl.abs(y),
                      propagate_nan=tl.PropagateNan.ALL)  # fmt: skip
    scale = tl.maximum(tl.math.div_rn(tl.max(amax, 0), _FP8_MAX), _MIN_SCALE)
    tl.store(scale_ptr + token, scale)
    codes = quantize_fp8(y, scale)
    tl.store(out_ptr + token * intermediate + cols, codes, mask=cols < intermediate)


def silu_and_mul(
    x: torch.Tensor,  # [num_tokens, 2 * intermediate]: gate then up
) -> torch.Tensor:
    """Triton SiLU-and-mul; same contract as :func:`silu_and_mul_ref` (any leading dims)."""
    lead, width = x.shape[:-1], x.shape[-1]
    x = row_major_last_dim(x.reshape(-1, width))
    num_tokens, intermediate = x.shape[0], width // 2
    out = torch.empty((num_tokens, intermediate), dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out.view(*lead, intermediate)
    block = min(next_power_of_2(intermediate), SILU_BLOCK)
    grid = (num_tokens, triton.cdiv(intermediate, block))
    _silu_and_mul_kernel[grid](
        x,
        out,
        intermediate,
        x.stride(0),
        out.stride(0),
        BLOCK=block,
        num_warps=max(1, min(8, block // 256)),
    )
    return out.view(*lead, intermediate)


def silu_and_mul_ref(
    x: torch.Tensor,  # [num_tokens, 2 * intermediate]: gate then up
) -> torch.Tensor:
    """Reference: ``silu(x[:, :I]) * x[:, I:]`` in the input dtype, as Hugging Face does."""
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]) * x[..., half:]


def _check_gated(x: torch.Tensor) -> torch.Tensor:
    if (
        x.dim() != 2
        or x.shape[1] % 2
        or x.dtype not in (torch.bfloat16, torch.float16, torch.float32)
    ):
        raise ValueError(
            f"SiLU-and-mul with fp8 output takes [M, 2 * intermediate] bf16/fp16/fp32, "
            f"got {x.dtype} {tuple(x.shape)}"
        )
    return row_major_last_dim(x)


def silu_and_mul_quant_fp8(
    x: torch.Tensor,  # [num_tokens, 2 * intermediate]: gate then up
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton SiLU-and-mul with per-token fp8 output; same contract as
    :func:`silu_and_mul_quant_fp8_ref`, and equal bit for bit to ``silu_and_mul`` then
    ``per_token_quant_fp8``."""
    x = _check_gated(x)
    num_tokens, intermediate = x.shape[0], x.shape[1] // 2
    out = torch.empty((num_tokens, intermediate), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((num_tokens, 1), dtype=torch.float32, device=x.device)
    if num_tokens == 0:
        return out, scale
    if num_tokens >= SILU_QUANT_ROW_MIN_TOKENS and intermediate <= SILU_QUANT_ROW_MAX:
        block = next_power_of_2(intermediate)
        _silu_and_mul_quant_row_kernel[(num_tokens,)](
            x, out, scale, intermediate, x.stride(0), BLOCK=block,
            num_warps=max(1, min(16, block // 1024)),
        )  # fmt: skip
        return out, scale
    low, high = SILU_QUANT_BLOCKS
    block = min(next_power_of_2(cdiv(intermediate, 8)), high)
    block = min(max(block, low), next_power_of_2(intermediate))
    _silu_and_mul_quant_kernel[(num_tokens,)](
        x,
        out,
        scale,
        intermediate,
        x.stride(0),
        BLOCK=block,
        num_warps=max(1, min(16, block // 128)),
    )
    return out, scale


def silu_and_mul_quant_fp8_ref(
    x: torch.Tensor,  # [num_tokens, 2 * intermediate]: gate then up
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: ``per_token_quant_fp8_ref(silu_and_mul_ref(x))``, i.e.
    ``(x_fp8 [M, intermediate] e4m3, scale [M, 1] fp32)``."""
    return per_token_quant_fp8_ref(silu_and_mul_ref(_check_gated(x)))
