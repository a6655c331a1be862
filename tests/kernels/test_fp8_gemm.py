"""The small-M fp8 matmul (Triton, interpreted) against an exact product and the reference.

Exact product: e4m3 values are multiples of ``2**-9`` below 448, so each ``x * w`` is a
multiple of ``2**-18`` below ``2**18`` and a float64 sum of up to ``2**15`` of them is exact.
An fp32 accumulation of ``K`` terms is then off by at most ``~K * 2**-24 * sum_k |x w|``;
random operands stay far inside that, and the tests hold both the kernel and the reference to
``ACC_RTOL * sum_k |x w|`` (scaled), the "rtol on the accumulator" of the contract.
"""

from __future__ import annotations

import pytest
import torch

from metroline.kernels import fp8_gemm
from metroline.kernels.fp8_gemm import (
    SMALL_M_MAX,
    fp8_gemm_small_m,
    fp8_gemm_small_m_ref,
    plan_fp8_gemm,
)
from metroline.kernels.fp8_quant import FP8_DTYPE

ACC_RTOL = 1e-5
#: bf16 / fp16 keep 8 / 11 significant bits: half an ulp, relative.
CAST_RTOL = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 0.0}


def fp8_operands(m: int, n: int, k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn((m, k), generator=gen) * 64).clamp(-448, 448).to(FP8_DTYPE)
    w = (torch.randn((n, k), generator=gen) * 64).clamp(-448, 448).to(FP8_DTYPE)
    x_scale = torch.rand((m, 1), generator=gen) * 1e-3 + 1e-4
    w_scale = torch.rand((n,), generator=gen) * 1e-2 + 1e-3
    return x, x_scale, w, w_scale


def exact_and_bound(x, x_scale, w, w_scale) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact result (float64) and the accumulator tolerance, both ``[M, N]``."""
    scales = x_scale.double() * w_scale.double()[None, :]
    exact = (x.double() @ w.double().t()) * scales
    magnitude = (x.double().abs() @ w.double().abs().t()) * scales
    return exact, ACC_RTOL * magnitude + 1e-30


def assert_close(y: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> None:
    """``y`` within the accumulator bound of ``exact`` plus the rounding of its own dtype."""
    assert not y.isnan().any()
    allowed = bound + CAST_RTOL[y.dtype] * exact.abs()
    excess = (y.double() - exact).abs() - allowed
    assert (excess <= 0).all(), f"worst excess {excess.max().item():.3e}"


# (N, K): one K tile, several uneven tiles, split-K even and uneven (the interpreter's nominal
# 4 SMs make N <= 256 split whenever K has 8 or more tiles).
SHAPES = [(48, 64), (96, 1040), (128, 2048), (80, 2000)]


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("n", "k"), SHAPES)
@pytest.mark.parametrize("m", [1, 3, SMALL_M_MAX])
def test_kernel_matches_exact_product(m, n, k, out_dtype):
    operands = fp8_operands(m, n, k, seed=m * 7919 + k)
    exact, bound = exact_and_bound(*operands)
    y = fp8_gemm_small_m(*operands, out_dtype)
    assert y.shape == (m, n) and y.dtype == out_dtype
    assert_close(y, exact, bound)
    assert_close(fp8_gemm_small_m_ref(*operands, out_dtype), exact, bound)


def test_shapes_cover_both_paths():
    plans = {shape: plan_fp8_gemm(*shape, sms=4) for shape in SHAPES}
    assert plans[(48, 64)].split_k == 1 and plans[(96, 1040)].split_k == 1
    assert plans[(128, 2048)].split_k == 2 and plans[(80, 2000)].split_k == 2
    assert 2000 % plans[(80, 2000)].block_k != 0  # the masked-K path, split


def test_deterministic_and_row_independent():
    """Same inputs, same bits; and a row's result does not depend on the other rows."""
    x, x_scale, w, w_scale = fp8_operands(SMALL_M_MAX, 80, 2000, seed=3)
    y = fp8_gemm_small_m(x, x_scale, w, w_scale, torch.float32)
    assert torch.equal(y, fp8_gemm_small_m(x, x_scale, w, w_scale, torch.float32))
    one = fp8_gemm_small_m(x[5:6], x_scale[5:6], w, w_scale, torch.float32)
    assert torch.equal(one, y[5:6])


def test_static_scale_broadcast_and_strided_rows():
    """A static input scale expanded to ``[M, 1]`` (row stride 0) and ``x`` rows with a
    stride (a column slice) give the same result as contiguous copies."""
    x, _, w, w_scale = fp8_operands(4, 64, 256, seed=5)
    wide = torch.zeros((4, 320), dtype=torch.uint8).view(FP8_DTYPE)
    wide[:, 32:288] = x
    shared = torch.full((1, 1), 3e-4).expand(4, 1)
    y = fp8_gemm_small_m(wide[:, 32:288], shared, w, w_scale, torch.float32)
    expected = fp8_gemm_small_m(x, shared.contiguous(), w, w_scale, torch.float32)
    assert torch.equal(y, expected)


def test_h200_plans():
    """llama3-8b projections on 132 SMs: split K only where the column tiles are too few."""
    sms = 132
    assert plan_fp8_gemm(4096, 4096, sms) == (256, 4, 1024)  # o_proj: 64 tiles x 4
    assert plan_fp8_gemm(6144, 4096, sms) == (256, 3, 1536)  # qkv: 96 tiles x 3
    assert plan_fp8_gemm(28672, 4096, sms).split_k == 1  # gate_up: 448 tiles
    assert plan_fp8_gemm(4096, 14336, sms) == (256, 5, 3072)  # down: 64 tiles x 5
    assert plan_fp8_gemm(128256, 4096, sms).split_k == 1
    for n, k in [(4096, 4096), (4096, 28672), (28672, 28672), (16, 16), (16, 48)]:
        plan = plan_fp8_gemm(n, k, sms)
        assert plan.k_per_split % plan.block_k == 0
        assert (plan.split_k - 1) * plan.k_per_split < k <= plan.split_k * plan.k_per_split


@pytest.mark.parametrize(
    ("rows", "x_dtype", "out_dtype", "match"),
    [
        (0, FP8_DTYPE, torch.bfloat16, "rows"),
        (SMALL_M_MAX + 1, FP8_DTYPE, torch.bfloat16, "rows"),
        (2, torch.bfloat16, torch.bfloat16, "e4m3"),
        (2, FP8_DTYPE, torch.int8, "writes"),
    ],
)
def test_rejects_what_it_does_not_take(rows, x_dtype, out_dtype, match):
    x, x_scale, w, w_scale = fp8_operands(max(rows, 1), 32, 64, seed=1)
    x, x_scale = x[:rows].to(x_dtype), x_scale[:rows]
    with pytest.raises(ValueError, match=match):
        fp8_gemm_small_m(x, x_scale, w, w_scale, out_dtype)


def test_rejects_a_column_major_weight():
    x, x_scale, w, w_scale = fp8_operands(2, 32, 64, seed=2)
    with pytest.raises(ValueError, match="contiguous"):
        fp8_gemm_small_m(x, x_scale, w.t().contiguous().t(), w_scale, torch.bfloat16)


def test_reference_takes_any_row_count():
    operands = fp8_operands(SMALL_M_MAX + 9, 32, 64, seed=4)
    exact, bound = exact_and_bound(*operands)
    assert_close(fp8_gemm_small_m_ref(*operands, torch.float32), exact, bound)


def test_start_up_check_accepts_the_kernel_and_names_a_failure(monkeypatch):
    """engine/layers/fp8_linear.check_small_batch_gemm: the worker routes decode-sized fp8
    matmuls through this kernel only when it compiles and agrees on every weight shape."""
    from torch import nn

    from metroline.engine.layers import fp8_linear
    from metroline.engine.quantization import Fp8Config

    model = nn.Module()
    for name, (n, k) in {"a": (64, 96), "b": (32, 64), "c": (64, 96)}.items():
        layer = nn.Module()
        weight = torch.randn(n, k) * 0.02
        layer.weight, layer.weight_scale = fp8_linear.quantize_per_channel(
            weight, weight.abs().amax(dim=1)
        )
        layer.fp8 = Fp8Config(from_checkpoint=False)
        model.add_module(name, layer)
    assert fp8_linear.check_small_batch_gemm(model, torch.float32) is None
    monkeypatch.setattr(fp8_gemm, "fp8_gemm_small_m", lambda *args: torch.zeros(1, 64))
    assert "relative error" in fp8_linear.check_small_batch_gemm(model, torch.float32)

    def broken(*args):
        raise RuntimeError("no such MMA")

    monkeypatch.setattr(fp8_gemm, "fp8_gemm_small_m", broken)
    assert "no such MMA" in fp8_linear.check_small_batch_gemm(model, torch.float32)
