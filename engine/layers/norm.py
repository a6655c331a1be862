"""RMSNorm, optionally fused with the residual add that precedes it, and optionally with the
per-token fp8 quantization of its output (when the projection it feeds has fp8 weights and
dynamic input scales: the output is then an :class:`~metroline.engine.layers.ops.Fp8Activation`
equal, bit for bit, to quantizing the unfused output)."""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .weights import default_weight_loader


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader  # type: ignore[attr-defined]
        #: Set by the model when every consumer of the output takes fp8 inputs.
        self.quantize_fp8 = False

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | ops.Fp8Activation | tuple[torch.Tensor | ops.Fp8Activation, torch.Tensor]:
        """Without ``residual``: ``norm(x)``. With it: ``(norm(x + residual), x + residual)``,
        the sum written into ``residual``."""
        if residual is None:
            if self.quantize_fp8:
                return ops.rms_norm_quant_fp8(x, self.weight, self.eps)
            return ops.rms_norm(x, self.weight, self.eps)
        if self.quantize_fp8:
            return ops.fused_add_rms_norm_quant_fp8(x, residual, self.weight, self.eps), residual
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps), residual
