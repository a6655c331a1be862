"""Gated MLP activation, optionally fused with the per-token fp8 quantization of its output
(for a down projection with fp8 weights and dynamic input scales)."""

from __future__ import annotations

import torch
from torch import nn

from . import ops


class SiluAndMul(nn.Module):
    """``[..., 2I] -> [..., I]``: ``silu(gate) * up``."""

    def __init__(self) -> None:
        super().__init__()
        #: Set by the model when the down projection takes fp8 inputs.
        self.quantize_fp8 = False

    def forward(self, x: torch.Tensor) -> torch.Tensor | ops.Fp8Activation:
        if self.quantize_fp8:
            return ops.silu_and_mul_quant_fp8(x)
        return ops.silu_and_mul(x)
