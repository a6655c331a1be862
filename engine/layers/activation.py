"""Gated MLP activation."""

from __future__ import annotations

import torch
from torch import nn

from . import ops


class SiluAndMul(nn.Module):
    """``[..., 2I] -> [..., I]``: ``silu(gate) * up``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.silu_and_mul(x)
