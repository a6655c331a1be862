"""RMSNorm, fused add + RMSNorm, RoPE and SiLU-and-mul (Triton, interpreted) against the
Hugging Face-semantics references. Outputs the launchers allocate start as NaN (conftest)."""

from __future__ import annotations

import pytest
import torch

from metroline.kernels.activation import silu_and_mul, silu_and_mul_ref
from metroline.kernels.rmsnorm import (
    fused_add_rms_norm,
    fused_add_rms_norm_ref,
    rms_norm,
    rms_norm_ref,
)
from metroline.kernels.rotary import rotary_embedding, rotary_embedding_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def tolerance(dtype):
    """fp32: summation order only. 16-bit: one rounding step of the output dtype."""
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}


@pytest.mark.parametrize("hidden", [64, 96, 1000])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(hidden, dtype):
    gen = torch.Generator().manual_seed(hidden)
    x = (3 * torch.randn((13, hidden), generator=gen)).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    out = rms_norm(x, weight, 1e-6)
    ref = rms_norm_ref(x, weight, 1e-6)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **tolerance(dtype))


@pytest.mark.parametrize("hidden", [128, 80, 640])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm(hidden, dtype):
    gen = torch.Generator().manual_seed(hidden + 1)
    x = torch.randn((9, hidden), generator=gen).to(dtype)
    residual = torch.randn((9, hidden), generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    ref_residual = residual.clone()
    ref = fused_add_rms_norm_ref(x, ref_residual, weight, 1e-5)
    out = fused_add_rms_norm(x, residual, weight, 1e-5)
    torch.testing.assert_close(residual, ref_residual, rtol=0, atol=0)  # same rounding
    torch.testing.assert_close(out, ref, **tolerance(dtype))


def test_rms_norm_strided_rows_and_fp32_weight():
    """Rows of a wider buffer; an fp32 weight promotes the output as the reference does."""
    buf = torch.randn(7, 300).to(torch.bfloat16)
    x = buf[:, 10:266]
    weight = torch.randn(256)
    out = rms_norm(x, weight, 1e-6)
    ref = rms_norm_ref(x, weight, 1e-6)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim"),
    [(4, 1, 64), (8, 2, 80), (6, 6, 96), (4, 2, 128), (2, 1, 256)],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary(num_heads, num_kv_heads, head_dim, dtype):
    gen = torch.Generator().manual_seed(head_dim)
    num_tokens, max_pos = 11, 64
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.arange(max_pos).float()[:, None] * inv_freq[None, :]
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    positions = torch.randint(0, max_pos, (num_tokens,), generator=gen)
    # q and k as views into a fused QKV buffer, rotated in place.
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn((num_tokens, width), generator=gen).to(dtype)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim]
    k = k.view(num_tokens, num_kv_heads, head_dim)
    ref_q, ref_k = q.clone(), k.clone()
    untouched = qkv[:, (num_heads + num_kv_heads) * head_dim :].clone()
    rotary_embedding_ref(positions, ref_q, ref_k, cos_sin)
    rotary_embedding(positions, q, k, cos_sin)
    exact = {"rtol": 0, "atol": 0} if dtype != torch.float32 else {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(q, ref_q, **exact)
    torch.testing.assert_close(k, ref_k, **exact)
    torch.testing.assert_close(qkv[:, (num_heads + num_kv_heads) * head_dim :], untouched)


@pytest.mark.parametrize("intermediate", [64, 96, 2500])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(intermediate, dtype):
    gen = torch.Generator().manual_seed(intermediate)
    x = (2 * torch.randn((7, 2 * intermediate), generator=gen)).to(dtype)
    out = silu_and_mul(x)
    ref = silu_and_mul_ref(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **tolerance(dtype))


def test_silu_and_mul_leading_dims():
    x = torch.randn(2, 3, 128)
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), rtol=1e-5, atol=1e-5)
