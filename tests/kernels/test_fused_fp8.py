"""RMSNorm, fused add + RMSNorm and SiLU-and-mul with fp8 output (Triton, interpreted): equal,
codes and scales bit for bit, to the unfused Triton kernels in turn
(``per_token_quant_fp8(rms_norm(...))``), so the engine may take either path, and to the
references (``per_token_quant_fp8_ref(rms_norm_ref(...))``) for bf16 rows. For fp32 rows the
unfused kernels themselves differ from their references in the last bit (the sum of squares in
another order; ``exp`` from another library: test_elementwise's tolerance), which can move a
code by one e4m3 step; there the references hold to one step, the unfused kernels exactly.

Inputs: bf16 and fp32, odd widths, a zero row (its scale is MIN_SCALE), rows of huge values
(the norm's own output stays bounded; SiLU's product reaches 1e30) and rows of tiny ones.
Outputs the launchers allocate start as NaN (conftest), so an unwritten code or scale fails.
"""

from __future__ import annotations

import pytest
import torch

from metroline.kernels.activation import (
    SILU_QUANT_ROW_MIN_TOKENS,
    silu_and_mul,
    silu_and_mul_quant_fp8,
    silu_and_mul_quant_fp8_ref,
    silu_and_mul_ref,
)
from metroline.kernels.fp8_quant import MIN_SCALE, per_token_quant_fp8, per_token_quant_fp8_ref
from metroline.kernels.rmsnorm import (
    fused_add_rms_norm,
    fused_add_rms_norm_quant_fp8,
    fused_add_rms_norm_quant_fp8_ref,
    fused_add_rms_norm_ref,
    rms_norm,
    rms_norm_quant_fp8,
    rms_norm_quant_fp8_ref,
    rms_norm_ref,
)

from .test_fp8_quant import assert_same_bytes

DTYPES = [torch.bfloat16, torch.float32]


def assert_same(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]):
    assert got[1].shape == want[1].shape and got[1].dtype == torch.float32
    assert torch.equal(got[1], want[1])
    assert_same_bytes(got[0], want[0])


def assert_matches_ref(got, want, dtype: torch.dtype) -> None:
    """Bit for bit from bf16 rows; from fp32 rows, scales to fp32 rounding and codes to one
    e4m3 step (``2**(floor(log2 |v|) - 3)``, ``2**-9`` below the normal range)."""
    if dtype != torch.float32:
        assert_same(got, want)
        return
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=0)
    a, b = got[0].float(), want[0].float()
    magnitude = torch.maximum(a.abs(), b.abs()).clamp_min(2.0**-6)
    assert ((a - b).abs() <= torch.exp2(torch.floor(torch.log2(magnitude)) - 3)).all()


def rows(num_rows: int, width: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Rows of different magnitudes, row 1 all zeros, row 2 huge, row 3 tiny."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((num_rows, width), generator=gen) * torch.logspace(-2, 2, num_rows)[:, None]
    x[1] = 0.0
    x[2] *= 1e15
    x[3] *= 1e-20
    return x.to(dtype)


@pytest.mark.parametrize("hidden", [80, 200])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_quant(hidden, dtype):
    x = rows(6, hidden, dtype, hidden)
    weight = 1 + 0.3 * torch.randn(hidden, generator=torch.Generator().manual_seed(2))
    weight[5] = 300.0  # an outlier channel sets the row's amax
    weight = weight.to(dtype)
    got = rms_norm_quant_fp8(x, weight, 1e-6)
    assert_same(got, per_token_quant_fp8(rms_norm(x, weight, 1e-6)))
    assert_matches_ref(got, rms_norm_quant_fp8_ref(x, weight, 1e-6), dtype)
    assert_matches_ref(got, per_token_quant_fp8_ref(rms_norm_ref(x, weight, 1e-6)), dtype)
    assert got[1][1, 0] == MIN_SCALE and not got[0].float().isnan().any()


@pytest.mark.parametrize("hidden", [80, 200])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_quant(hidden, dtype):
    x = rows(5, hidden, dtype, hidden + 1)
    residual = rows(5, hidden, dtype, hidden + 2)
    residual[1] = 0.0  # with x's zero row: a zero sum
    weight = (1 + 0.3 * torch.randn(hidden, generator=torch.Generator().manual_seed(3))).to(dtype)
    residuals = [residual.clone() for _ in range(3)]
    got = fused_add_rms_norm_quant_fp8(x, residual, weight, 1e-5)
    assert_same(got, per_token_quant_fp8(fused_add_rms_norm(x, residuals[0], weight, 1e-5)))
    want = fused_add_rms_norm_quant_fp8_ref(x, residuals[1], weight, 1e-5)
    assert_matches_ref(got, want, dtype)
    want = per_token_quant_fp8_ref(fused_add_rms_norm_ref(x, residuals[2], weight, 1e-5))
    assert_matches_ref(got, want, dtype)
    for other in residuals:
        torch.testing.assert_close(residual, other, rtol=0, atol=0)  # residual += x, once
    assert got[1][1, 0] == MIN_SCALE


def test_rms_norm_quant_promotes_and_packs_narrow_rows():
    """An fp32 weight on bf16 rows quantizes the fp32 norm (the unfused output); rows of 48
    are packed several to a program, each with its own scale; strided rows are read in place."""
    buf = rows(37, 60, torch.bfloat16, 7)
    x = buf[:, 4:52]  # row stride 60
    weight = torch.randn(48, generator=torch.Generator().manual_seed(4))
    got = rms_norm_quant_fp8(x, weight, 1e-6)
    assert_same(got, per_token_quant_fp8(rms_norm(x, weight, 1e-6)))
    assert_same(got, rms_norm_quant_fp8_ref(x, weight, 1e-6))


# Huge negative gates overflow exp(-gate) to inf: silu is -0 there, as on the GPU.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize(
    ("num_tokens", "intermediate"),
    # 2100: several tiles a row; 64 tokens: the one-pass kernel (the whole row in a tile).
    [(5, 80), (5, 200), (5, 2100), (SILU_QUANT_ROW_MIN_TOKENS, 200)],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_quant(num_tokens, intermediate, dtype):
    x = rows(num_tokens, 2 * intermediate, dtype, intermediate)
    got = silu_and_mul_quant_fp8(x)
    assert got[0].shape == (num_tokens, intermediate) and got[1].shape == (num_tokens, 1)
    assert_same(got, per_token_quant_fp8(silu_and_mul(x)))
    assert_matches_ref(got, silu_and_mul_quant_fp8_ref(x), dtype)
    assert_matches_ref(got, per_token_quant_fp8_ref(silu_and_mul_ref(x)), dtype)
    assert got[1][1, 0] == MIN_SCALE and got[1][3, 0] == MIN_SCALE
    assert torch.isfinite(got[1]).all() and not got[0].float().isnan().any()


def test_no_rows_launch_nothing_and_bad_shapes_are_refused():
    empty = torch.empty((0, 64), dtype=torch.bfloat16)
    weight = torch.ones(64, dtype=torch.bfloat16)
    for x_fp8, scale in (
        rms_norm_quant_fp8(empty, weight, 1e-6),
        fused_add_rms_norm_quant_fp8(empty, empty.clone(), weight, 1e-6),
    ):
        assert x_fp8.shape == (0, 64) and scale.shape == (0, 1)
    x_fp8, scale = silu_and_mul_quant_fp8(empty)
    assert x_fp8.shape == (0, 32) and scale.shape == (0, 1)
    with pytest.raises(ValueError, match=r"\[M, hidden\]"):
        rms_norm_quant_fp8(torch.zeros((2, 3, 64)), weight, 1e-6)
    with pytest.raises(ValueError, match=r"\[M, hidden\]"):
        rms_norm_quant_fp8_ref(torch.zeros((2, 64), dtype=torch.float64), weight, 1e-6)
    with pytest.raises(ValueError, match="2 \\* intermediate"):
        silu_and_mul_quant_fp8(torch.zeros((2, 63)))
    with pytest.raises(ValueError, match="2 \\* intermediate"):
        silu_and_mul_quant_fp8_ref(torch.zeros((2, 3, 64)))
