"""Rotary position embedding (neox layout), with llama3 frequency scaling.

Frequencies follow Hugging Face's definitions exactly (same float32 arithmetic), so cos/sin
match the reference bit for bit on the same device.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from . import ops


def inverse_frequencies(
    head_dim: int, base: float, rope_scaling: dict[str, Any] | None, device: torch.device
) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (base**exponents)
    if rope_scaling is None:
        return inv_freq
    factor = float(rope_scaling["factor"])
    low_freq_factor = float(rope_scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(rope_scaling.get("high_freq_factor", 4.0))
    old_context_len = float(rope_scaling.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def cos_sin_cache(
    head_dim: int,
    max_positions: int,
    base: float,
    rope_scaling: dict[str, Any] | None,
    device: torch.device,
) -> torch.Tensor:
    """``[max_positions, head_dim]`` fp32: cos of each frequency, then sin."""
    inv_freq = inverse_frequencies(head_dim, base, rope_scaling, device)
    positions = torch.arange(max_positions, dtype=torch.float32, device=device)
    freqs = positions[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        base: float,
        rope_scaling: dict[str, Any] | None,
    ) -> None:
        super().__init__()
        # Built on the default device (the one the model is built on): cos/sin can differ in
        # the last ulp between devices, and the reference computes them where the model runs.
        device = torch.empty(0).device
        self.register_buffer(
            "cos_sin_cache",
            cos_sin_cache(head_dim, max_positions, base, rope_scaling, device),
            persistent=False,
        )

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> None:
        """Rotate ``query [T, H, D]`` and ``key [T, Hkv, D]`` in place."""
        ops.rotary_embedding(positions, query, key, self.cos_sin_cache)
