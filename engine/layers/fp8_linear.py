"""fp8 (e4m3) weights of one projection: the parameters, their loaders, and the matmul.

A quantized projection holds ``weight`` as ``float8_e4m3fn`` ``[out, in]`` and ``weight_scale``
fp32 ``[out]``, so that ``W ~= weight.float() * weight_scale[:, None]``; with static activation
scales also ``input_scale`` fp32 ``[1]``. Internally every weight scale is per output channel: a
checkpoint's per-tensor scale of one packed shard (q, k, v; gate, up) fills that shard's rows,
which is exact (nothing is quantized twice).

Online quantization (a model-dtype checkpoint) loads the weight in the model dtype and
quantizes it in :func:`finish_fp8_loading`, with each row's scale ``amax(|row|) / 448``. A
row-parallel layer's rows are split across ranks: the amax is reduced over the group, so every
TP degree holds the same fp8 weights.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from metroline.kernels import fp8_gemm
from metroline.kernels.fp8_quant import FP8_DTYPE, FP8_MAX, per_token_quant_fp8

from ..distributed import TensorParallelGroup
from ..quantization import Fp8Config
from . import ops
from .weights import copy_checked, new_parameter, read_all, read_narrow, source_shape

logger = logging.getLogger(__name__)

#: Largest relative error of the small-batch kernel against the emulated product that its
#: start-up check accepts (bf16 outputs round at 2**-9; the kernels agree to about 2e-3).
SMALL_BATCH_CHECK_BOUND = 1e-2
#: Output columns at each end of a weight that the start-up check compares.
CHECK_ROWS = 256

#: Smallest weight scale online quantization uses: an all-zero row must not divide by zero.
MIN_WEIGHT_SCALE = 1e-12

#: ``(param_offset, size, source_start)``: which rows of the parameter a checkpoint shard
#: fills, and where they start in the checkpoint tensor.
ShardRows = Any


def weight_dtype(fp8: Fp8Config | None) -> torch.dtype | None:
    """The weight parameter's dtype while loading (None: the model dtype)."""
    return FP8_DTYPE if fp8 is not None and fp8.from_checkpoint else None


def create_fp8_params(layer: nn.Module, fp8: Fp8Config, rows: int, shard_rows: Any) -> None:
    """Add ``weight_scale`` (and ``input_scale``) to ``layer``, whose ``rows`` output channels
    map to checkpoint shards through ``shard_rows(shard_id) -> (offset, size, start)``; with
    ``shard_rows`` None the rows are never split (a row-parallel layer)."""
    layer.fp8 = fp8
    if not fp8.from_checkpoint:
        layer.register_buffer("weight_scale", None, persistent=False)
        layer.input_scale = None
        return

    def load_weight_scale(param: nn.Parameter, source: Any, shard_id: Any = None) -> None:
        offset, size, start = shard_rows(shard_id) if shard_rows else (0, rows, 0)
        target = param.data.narrow(0, offset, size)
        shape = source_shape(source)
        if _numel(shape) == 1:  # per tensor: one scale for the whole shard
            target.fill_(read_all(source).reshape(()).item())
            return
        if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
            raise ValueError(
                f"weight_scale of shape {shape} is neither per tensor nor per output channel "
                "(block-wise scales are not supported)"
            )
        loaded = read_narrow(source, 0, start, size) if shard_rows else read_all(source)
        copy_checked(target, loaded.reshape(-1).float())

    layer.weight_scale = new_parameter(rows, loader=load_weight_scale, dtype=torch.float32)
    if fp8.activation_scheme == "static":
        layer.input_scale = new_parameter(1, loader=_load_input_scale, dtype=torch.float32)
        layer.input_scale.data.zero_()
    else:
        layer.input_scale = None


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def _load_input_scale(param: nn.Parameter, source: Any, shard_id: Any = None) -> None:
    """Static activation scale; packed shards share one input, so the largest scale wins
    (every shard's input then stays within the e4m3 range)."""
    del shard_id
    loaded = read_all(source)
    if loaded.numel() != 1:
        raise ValueError(
            f"input_scale must be one value per tensor; got shape {tuple(loaded.shape)}"
        )
    param.data.copy_(torch.maximum(param.data, loaded.reshape(1).float().to(param.device)))


def quantize_per_channel(
    weight: torch.Tensor, amax: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight_fp8, scale)`` with ``scale = max(amax / 448, MIN_WEIGHT_SCALE)`` per row."""
    scale = (amax.float() / FP8_MAX).clamp(min=MIN_WEIGHT_SCALE)
    quantized = torch.empty(weight.shape, dtype=FP8_DTYPE, device=weight.device)
    for start in range(0, weight.shape[0], 4096):  # bounds the fp32 copy's memory
        rows = slice(start, start + 4096)
        scaled = weight[rows].float() / scale[rows, None]
        quantized[rows] = scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return quantized, scale


def finish_fp8_loading(layer: nn.Module, row_group: TensorParallelGroup | None = None) -> None:
    """After every shard is loaded: quantize an online layer (``row_group``: the group over
    which each row's input features are split), or check a checkpoint's scales."""
    if layer.fp8.from_checkpoint:
        for name in ("weight_scale", "input_scale"):
            scale = getattr(layer, name)
            if scale is not None and not bool(torch.isfinite(scale).all() and (scale > 0).all()):
                raise ValueError(f"checkpoint {name} holds values that are not finite and > 0")
        return
    weight = layer.weight.data
    amax = weight.abs().amax(dim=1).float()
    if row_group is not None:
        row_group.all_reduce_max(amax)
    quantized, scale = quantize_per_channel(weight, amax)
    layer.weight = nn.Parameter(quantized, requires_grad=False)
    layer.weight_scale = scale


def takes_fp8_input(layer: nn.Module) -> bool:
    """Whether ``layer`` may be fed an :class:`~metroline.engine.layers.ops.Fp8Activation`:
    fp8 weights with dynamic (per-token) input scales."""
    fp8 = getattr(layer, "fp8", None)
    return fp8 is not None and fp8.activation_scheme == "dynamic"


def fp8_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x W^T`` in the input's dtype (no bias) through the fp8 matmul."""
    return ops.fp8_linear(x, layer.weight, layer.weight_scale, layer.input_scale)


def check_small_batch_gemm(model: nn.Module, dtype: torch.dtype) -> str | None:
    """Run ``kernels.fp8_gemm`` once on every distinct fp8 weight shape of ``model`` at one
    and at ``SMALL_M_MAX`` rows, against the same product emulated in fp32; None when every
    shape compiles and agrees within ``SMALL_BATCH_CHECK_BOUND``, else the reason. This also
    compiles its variants before any CUDA graph is captured."""
    seen: set[tuple[int, int]] = set()
    generator = torch.Generator(device="cpu").manual_seed(0)
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if getattr(module, "fp8", None) is None or weight is None or weight.dtype != FP8_DTYPE:
            continue
        shape = tuple(weight.shape)
        if shape in seen:
            continue
        seen.add(shape)
        for rows in (1, fp8_gemm.SMALL_M_MAX):
            x = torch.randn(rows, shape[1], generator=generator).to(weight.device)
            x_fp8, x_scale = per_token_quant_fp8(x.to(dtype))
            operands = (x_fp8, x_scale, weight.data, module.weight_scale)
            try:
                y = fp8_gemm.fp8_gemm_small_m(*operands, dtype).float()
            except Exception as error:  # a compile failure: the library GEMM serves instead
                return f"{shape} x {rows} rows raised {error!r:.300}"
            # The first and the last CHECK_ROWS output columns: the reference dequantizes
            # only those weight rows (a whole one would take 4 bytes per weight).
            cols = torch.arange(shape[0], device=weight.device)
            cols = torch.cat([cols[:CHECK_ROWS], cols[-CHECK_ROWS:]]).unique()
            ref = fp8_gemm.fp8_gemm_small_m_ref(
                x_fp8, x_scale, weight.data[cols], module.weight_scale[cols], torch.float32
            )
            error = float((y[:, cols] - ref).norm() / ref.norm().clamp_min(1e-30))
            if not error <= SMALL_BATCH_CHECK_BOUND:
                return f"{shape} x {rows} rows: relative error {error:.2e}"
    return None
