"""FP8 activation quantization (Triton, interpreted) against the references, bit for bit, and
the e4m3 round-trip bound both fp8 paths rely on.

Round-trip bound: with ``y = x / scale`` inside ``[-448, 448]``, rounding to e4m3 (3 mantissa
bits, nearest even) is off by at most half a unit in the last place: ``2**-4 * |y|`` where ``y``
is normal (``|y| >= 2**-6``) and ``2**-10`` (half the smallest subnormal step) below. Hence
``|fp8 * scale - x| <= max(2**-4 * |x|, 2**-10 * scale)``, up to fp32 rounding.
"""

from __future__ import annotations

import pytest
import torch

from metroline.kernels.fp8_quant import (
    FP8_MAX,
    MIN_SCALE,
    per_token_quant_fp8,
    per_token_quant_fp8_ref,
    static_quant_fp8,
    static_quant_fp8_ref,
)

RELATIVE_BOUND = 2.0**-4
SUBNORMAL_BOUND = 2.0**-10


def assert_round_trip(x: torch.Tensor, x_fp8: torch.Tensor, scale: torch.Tensor) -> float:
    """``x_fp8 * scale`` is within the e4m3 bound of ``x`` (``scale`` broadcastable to ``x``);
    returns the worst relative error over elements with a normal code."""
    x = x.float()
    error = (x_fp8.float() * scale - x).abs()
    bound = torch.maximum(x.abs() * RELATIVE_BOUND, scale * SUBNORMAL_BOUND) * (1 + 2.0**-20)
    assert (error <= bound).all(), f"worst excess {(error - bound).max().item():.3e}"
    normal = (x / scale).abs() >= 2.0**-6
    return (error[normal] / x.abs()[normal]).max().item()


def assert_same_bytes(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype == torch.float8_e4m3fn and a.shape == b.shape
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k", [80, 4100])
def test_per_token_matches_reference(dtype, k):
    gen = torch.Generator().manual_seed(k)
    x = (torch.randn((5, k), generator=gen) * torch.logspace(-3, 3, 5)[:, None]).to(dtype)
    x[2] = 0.0  # a zero row takes MIN_SCALE, not 0 / 0
    x[3] = 0.0
    x[3, 7] = 1e-30 if dtype == torch.float32 else 1e-7  # a tiny row: MIN_SCALE too
    out, scale = per_token_quant_fp8(x)
    ref_out, ref_scale = per_token_quant_fp8_ref(x)
    assert scale.shape == (5, 1) and scale.dtype == torch.float32
    assert torch.equal(scale, ref_scale)
    assert_same_bytes(out, ref_out)
    assert scale[2, 0] == MIN_SCALE and scale[3, 0] == MIN_SCALE
    assert not out.float().isnan().any()
    assert (out.float().abs().amax(dim=1)[[0, 1, 4]] == FP8_MAX).all()  # amax maps to 448
    worst = assert_round_trip(x, out, scale)
    assert worst > 2.0**-5  # the bound is tight, not vacuous


def test_per_token_long_rows_and_huge_values():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((3, 28672), generator=gen)
    x[0, 5] = 3e38  # near fp32's max: the scale stays finite, the row's other codes tiny
    x[1] *= 1e20
    out, scale = per_token_quant_fp8(x)
    ref_out, ref_scale = per_token_quant_fp8_ref(x)
    assert torch.equal(scale, ref_scale) and torch.isfinite(scale).all()
    assert_same_bytes(out, ref_out)
    assert not out.float().isnan().any()
    assert_round_trip(x[1:], out[1:], scale[1:])


def test_per_token_no_rows_and_strided_rows():
    out, scale = per_token_quant_fp8(torch.empty((0, 64), dtype=torch.bfloat16))
    assert out.shape == (0, 64) and scale.shape == (0, 1)
    wide = torch.randn((4, 96)).to(torch.bfloat16)
    view = wide[:, 16:80]  # row stride 96, last dim contiguous
    out, scale = per_token_quant_fp8(view)
    ref_out, ref_scale = per_token_quant_fp8_ref(view)
    assert torch.equal(scale, ref_scale)
    assert_same_bytes(out, ref_out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [80, 4100])
def test_static_matches_reference_and_clamps(dtype, k):
    gen = torch.Generator().manual_seed(k + 1)
    scale = torch.tensor([0.0125])
    x = torch.randn((3, k), generator=gen).to(dtype)
    x[1, ::7] = 1e4  # beyond 448 * scale: clamped to 448, never NaN
    x[2, ::5] = -1e4
    out = static_quant_fp8(x, scale)
    assert_same_bytes(out, static_quant_fp8_ref(x, scale))
    assert (out.float()[1, ::7] == FP8_MAX).all() and (out.float()[2, ::5] == -FP8_MAX).all()
    in_range = (x.float() / scale).abs() <= FP8_MAX
    error = (out.float() * scale - x.float()).abs()
    bound = torch.maximum(x.float().abs() * RELATIVE_BOUND, scale * SUBNORMAL_BOUND)
    assert (error[in_range] <= bound[in_range] * (1 + 2.0**-20)).all()
    assert static_quant_fp8(x[:0], scale).shape == (0, k)


def test_rejects_what_it_does_not_quantize():
    with pytest.raises(ValueError, match="bf16/fp16/fp32"):
        per_token_quant_fp8(torch.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="bf16/fp16/fp32"):
        static_quant_fp8(torch.zeros((2, 4), dtype=torch.float64), torch.ones(1))


def test_nan_stays_nan():
    """A NaN input yields a NaN code, as torch's cast does: never a finite value downstream."""
    x = torch.randn(2, 64)
    x[0, 5] = float("nan")
    codes, _ = per_token_quant_fp8(x)
    static = static_quant_fp8(x, torch.tensor([0.01]))
    for quantized in (codes, static):
        assert quantized[0, 5].float().isnan()
        assert not quantized[1].float().isnan().any()
