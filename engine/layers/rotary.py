"""Rotary position embedding (neox layout), with llama3, linear, dynamic NTK and YaRN
frequency scaling (parameters normalised by ``engine/rope_scaling.py``).

Frequencies follow Hugging Face's definitions exactly (same float32 arithmetic), so cos/sin
match the reference bit for bit on the same device. YaRN's attention factor (mscale) scales
cos and sin in the cache, as transformers scales them, so the kernel needs no knowledge of it.
Dynamic NTK has the unscaled frequencies: it is served only within
``max_position_embeddings``, where transformers leaves them unscaled too.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def inverse_frequencies(
    head_dim: int, base: float, rope_scaling: dict[str, Any] | None, device: torch.device
) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (base**exponents)
    kind = None if rope_scaling is None else rope_scaling.get("rope_type", "llama3")
    if kind in (None, "dynamic"):
        return inv_freq
    if kind == "linear":
        return inv_freq / float(rope_scaling["factor"])
    if kind == "yarn":
        return _yarn_frequencies(head_dim, base, rope_scaling, device)
    if kind != "llama3":
        raise ValueError(f"unsupported rope scaling type {kind!r}")
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


def _yarn_frequencies(
    head_dim: int, base: float, scaling: dict[str, Any], device: torch.device
) -> torch.Tensor:
    """NTK-by-parts: interpolated (divided by the factor) below the ``beta_slow`` rotation
    count, extrapolated (unchanged) above ``beta_fast``, a linear ramp in between."""
    factor = float(scaling["factor"])
    original = scaling["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(scaling["beta_fast"]), correction_dim(scaling["beta_slow"])
    if scaling["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = (torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)
    extrapolation_weight = 1 - torch.clamp(ramp, 0, 1).to(device=device, dtype=torch.float)
    pos_freqs = base ** (
        torch.arange(0, head_dim, 2).to(device=device, dtype=torch.float) / head_dim
    )
    extrapolated = 1.0 / pos_freqs
    interpolated = 1.0 / (factor * pos_freqs)
    return interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight


def attention_factor(rope_scaling: dict[str, Any] | None) -> float:
    """What cos and sin are multiplied by: YaRN's mscale, else 1."""
    if rope_scaling is None or rope_scaling.get("rope_type") != "yarn":
        return 1.0
    return float(rope_scaling["attention_factor"])


def cos_sin_cache(
    head_dim: int,
    max_positions: int,
    base: float,
    rope_scaling: dict[str, Any] | None,
    device: torch.device,
) -> torch.Tensor:
    """``[max_positions, head_dim]`` fp32: cos of each frequency, then sin (both times the
    attention factor)."""
    inv_freq = inverse_frequencies(head_dim, base, rope_scaling, device)
    positions = torch.arange(max_positions, dtype=torch.float32, device=device)
    freqs = positions[:, None] * inv_freq[None, :]
    scale = attention_factor(rope_scaling)
    if scale == 1.0:
        return torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    return torch.cat((freqs.cos() * scale, freqs.sin() * scale), dim=-1)


class RotaryEmbedding(nn.Module):
    """A layer's cos/sin table (:func:`cos_sin_cache`). The rotation itself runs in the
    attention layer's cache-write launch (:func:`ops.rotary_and_write_kv`)."""

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
