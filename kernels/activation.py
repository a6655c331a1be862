"""SiLU-and-mul: the gated MLP activation ``silu(gate) * up``.

The Triton kernel follows Hugging Face's rounding: ``silu(gate)`` is computed in fp32 and
rounded to the input dtype, then multiplied by ``up`` in fp32 and rounded again. Grid: one
program per (token, column tile).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .utils import next_power_of_2, row_major_last_dim


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [num_tokens, 2 * intermediate]: gate then up, last dim contiguous
    out_ptr,  # [num_tokens, intermediate], last dim contiguous
    intermediate,
    stride_x, stride_o,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate_ptr = x_ptr + token * stride_x + cols
    gate = tl.load(gate_ptr, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptr + intermediate, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + token * stride_o + cols, (silu * up).to(dtype), mask=mask)


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
    block = min(next_power_of_2(intermediate), 2048)
    grid = (num_tokens, triton.cdiv(intermediate, block))
    _silu_and_mul_kernel[grid](
        x, out, intermediate, x.stride(0), out.stride(0),
        BLOCK=block, num_warps=max(1, min(8, block // 256)),
    )
    return out.view(*lead, intermediate)


def silu_and_mul_ref(
    x: torch.Tensor,  # [num_tokens, 2 * intermediate]: gate then up
) -> torch.Tensor:
    """Reference: ``silu(x[:, :I]) * x[:, I:]`` in the input dtype, as Hugging Face does."""
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]) * x[..., half:]
