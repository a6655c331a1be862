"""SiLU-and-mul: the gated MLP activation ``silu(gate) * up``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_ref(
    x: torch.Tensor,  # [num_tokens, 2 * intermediate]: gate then up
) -> torch.Tensor:
    """Reference: ``silu(x[:, :I]) * x[:, I:]`` in the input dtype, as Hugging Face does."""
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]) * x[..., half:]
