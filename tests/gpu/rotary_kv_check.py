"""A section of ``check_kernels.py``: the RoPE + KV-write launch at real sizes against the two
launches it replaces (``rotary_embedding``, then ``write_kv_cache``), byte for byte: the
rotated queries and both caches, over bf16 and fp8 caches (per-head scales), llama3-8b heads,
q/k/v as views into a fused QKV buffer, skipped slots, and the key left unrotated."""

from __future__ import annotations

from collections.abc import Callable

import torch

from metroline.kernels.kv_cache import write_kv_cache
from metroline.kernels.rotary import rotary_embedding
from metroline.kernels.rotary_kv import rotary_and_write_kv

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def check_rotary_kv(record: Callable[..., None], device: str, tokens: int = 8192) -> None:
    """``record(name, dtype, err, bound, **extra)`` as check_kernels records a result."""
    inv_freq = 1.0 / (500000 ** (torch.arange(0, HEAD_DIM, 2, device=device).float() / HEAD_DIM))
    freqs = torch.arange(8192, device=device).float()[:, None] * inv_freq[None, :]
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    widths = [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM]
    for cache in ("bf16", "fp8"):
        for num_tokens in (1, tokens):
            qkv = torch.randn(num_tokens, sum(widths), device=device, dtype=torch.bfloat16)
            positions = torch.randint(0, 8192, (num_tokens,), device=device)
            slots = torch.randperm(1024 * 16, device=device)[:num_tokens]
            slots[1::9] = -1
            cache_dtype = torch.float8_e4m3fn if cache == "fp8" else torch.bfloat16
            scales = {}
            if cache == "fp8":
                k_scale = torch.linspace(0.002, 0.05, KV_HEADS, device=device)
                scales = {"k_scale": k_scale, "v_scale": k_scale.flip(0).contiguous()}
            results = []
            for fused in (False, True):
                buffer = qkv.clone()
                q, k, v = (p.view(num_tokens, -1, HEAD_DIM) for p in buffer.split(widths, -1))
                shape = (1024, 16, KV_HEADS, HEAD_DIM)
                kc = torch.full(shape, float("nan"), device=device).to(cache_dtype)
                vc = torch.full(shape, float("nan"), device=device).to(cache_dtype)
                if fused:
                    rotary_and_write_kv(positions, q, k, v, cos_sin, kc, vc, slots, **scales)
                else:
                    rotary_embedding(positions, q, k, cos_sin)
                    write_kv_cache(k, v, kc, vc, slots, **scales)
                results.append((q, k, kc, vc))
            (q2, _, kc2, vc2), (q1, k1, kc1, vc1) = results
            key_kept = torch.equal(k1, qkv[:, widths[0] : widths[0] + widths[1]].view_as(k1))
            same = _same_bytes(q1, q2) and _same_bytes(kc1, kc2) and _same_bytes(vc1, vc2)
            record(
                f"rotary + KV write, one launch = two, {cache} cache, {num_tokens} tokens",
                torch.bfloat16,
                0.0 if same and key_kept else 1.0,
                0.5,
                same_bytes=same,
                key_kept=key_kept,
            )
