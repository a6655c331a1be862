"""RMSNorm, and residual-add fused with RMSNorm, with Hugging Face Llama semantics.

``y = weight * (x_fp32 * rsqrt(mean(x_fp32**2) + eps)).to(x.dtype)``. The fused form first
adds in the input dtype (``residual = x + residual``, as Hugging Face does) and normalises the
rounded sum; it updates ``residual`` in place.
"""

from __future__ import annotations

import torch


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
