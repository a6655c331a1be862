"""Rotary position embedding, neox layout (rotate halves), applied to q and k in place.

``cos_sin_cache`` is ``[max_positions, head_dim]`` in fp32: the first ``head_dim/2`` columns
hold ``cos(pos * inv_freq)``, the rest ``sin(pos * inv_freq)``. Any frequency scaling
(llama3) is already folded into the cache. As in Hugging Face, cos and sin are cast to the
input dtype before they multiply.
"""

from __future__ import annotations

import torch


def rotary_embedding_ref(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotated in place
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], rotated in place
    cos_sin_cache: torch.Tensor,  # [max_positions, head_dim] fp32
) -> None:
    """Reference: ``x = x * cos + rotate_half(x) * sin`` for q and k."""
    half = cos_sin_cache.shape[1] // 2
    cos_sin = cos_sin_cache[positions.long()]
    for x in (query, key):
        cos = cos_sin[:, None, :half].to(x.dtype)
        sin = cos_sin[:, None, half:].to(x.dtype)
        cos = torch.cat((cos, cos), dim=-1)
        sin = torch.cat((sin, sin), dim=-1)
        x1, x2 = x[..., :half], x[..., half:]
        rotated = torch.cat((-x2, x1), dim=-1)
        x.copy_(x * cos + rotated * sin)
