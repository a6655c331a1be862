"""Linear layers split across tensor-parallel ranks. At TP=1 each is a plain linear layer.

- :class:`ColumnParallelLinear` splits the output features (rank ``r`` holds rows
  ``r*out/tp : (r+1)*out/tp`` of the weight); :class:`MergedColumnParallelLinear` packs
  several such outputs (gate and up), :class:`QKVParallelLinear` packs q, k and v heads.
- :class:`RowParallelLinear` splits the input features and all-reduces the partial sums.

Every parameter carries ``weight_loader(param, source, shard_id)`` that copies its rank's
shard out of a checkpoint tensor, so loading needs no sharding framework. Given an
:class:`~metroline.engine.quantization.Fp8Config` a layer holds fp8 weights with their scales
(:mod:`metroline.engine.layers.fp8_linear`); the sharding rules are the same.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import get_tp_group, get_tp_rank, get_tp_size
from ..quantization import Fp8Config
from .fp8_linear import create_fp8_params, finish_fp8_loading, fp8_forward, weight_dtype
from .weights import copy_checked, default_weight_loader, new_parameter, read_narrow


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by TP size {denominator}")
    return numerator // denominator


class ColumnParallelLinear(nn.Module):
    """``y_local = x W_local^T``: each rank computes a slice of the output features."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, fp8: Fp8Config | None = None
    ) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        rows = self.out_features_per_rank = _divide(out_features, self.tp_size, "output features")
        self.weight = new_parameter(
            rows, in_features, loader=self.weight_loader, dtype=weight_dtype(fp8)
        )
        self.bias = new_parameter(rows, loader=self.weight_loader) if bias else None
        self.fp8 = None
        if fp8 is not None:
            create_fp8_params(self, fp8, rows, self.shard_rows)

    def shard_rows(self, shard_id: Any) -> tuple[int, int, int]:
        """``(offset, size, start)``: checkpoint shard ``shard_id`` fills parameter rows
        ``offset:offset+size`` from its rows ``start:start+size``."""
        del shard_id
        rows = self.out_features_per_rank
        return 0, rows, self.tp_rank * rows

    def weight_loader(self, param: nn.Parameter, source: Any, shard_id: Any = None) -> None:
        offset, size, start = self.shard_rows(shard_id)
        copy_checked(param.data.narrow(0, offset, size), read_narrow(source, 0, start, size))

    def finish_loading(self) -> None:
        if self.fp8 is not None:
            finish_fp8_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8 is None:
            return F.linear(x, self.weight, self.bias)
        y = fp8_forward(self, x)
        return y if self.bias is None else y + self.bias


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul; ``shard_id`` is the output's index."""

    def __init__(
        self,
        in_features: int,
        output_sizes: list[int],
        bias: bool = False,
        fp8: Fp8Config | None = None,
    ) -> None:
        self.output_sizes = list(output_sizes)
        self.shard_sizes = [_divide(s, get_tp_size(), "output features") for s in output_sizes]
        super().__init__(in_features, sum(output_sizes), bias, fp8)

    def shard_rows(self, shard_id: Any) -> tuple[int, int, int]:
        if shard_id is None:
            raise ValueError("a merged linear layer loads one shard at a time")
        size = self.shard_sizes[shard_id]
        return sum(self.shard_sizes[:shard_id]), size, self.tp_rank * size


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul. Each rank holds whole heads: ``heads/tp`` query
    heads and ``kv_heads/tp`` KV heads, or one KV head replicated when ``tp > kv_heads``."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        fp8: Fp8Config | None = None,
    ) -> None:
        tp_size, tp_rank = get_tp_size(), get_tp_rank()
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp_size, "attention heads")
        if tp_size >= num_kv_heads:
            _divide(tp_size, num_kv_heads, "KV heads (TP must be a multiple of them)")
            self.num_kv_heads = 1
            self.kv_head_start = tp_rank * num_kv_heads // tp_size
        else:
            self.num_kv_heads = _divide(num_kv_heads, tp_size, "KV heads")
            self.kv_head_start = tp_rank * self.num_kv_heads
        out_per_rank = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        super().__init__(hidden_size, out_per_rank * tp_size, bias, fp8)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def shard_rows(self, shard_id: Any) -> tuple[int, int, int]:
        kv_start = self.kv_head_start * self.head_dim
        if shard_id == "q":
            return 0, self.q_size, self.tp_rank * self.q_size
        if shard_id == "k":
            return self.q_size, self.kv_size, kv_start
        if shard_id == "v":
            return self.q_size + self.kv_size, self.kv_size, kv_start
        raise ValueError(f"QKV shard id must be 'q', 'k' or 'v'; got {shard_id!r}")


class RowParallelLinear(nn.Module):
    """``y = sum_r x_r W_r^T + b``: each rank holds a slice of the input features."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, fp8: Fp8Config | None = None
    ) -> None:
        super().__init__()
        self.tp_group = get_tp_group()
        self.tp_rank, self.tp_size = self.tp_group.rank, self.tp_group.world_size
        cols = self.in_features_per_rank = _divide(in_features, self.tp_size, "input features")
        self.weight = new_parameter(
            out_features, cols, loader=self.weight_loader, dtype=weight_dtype(fp8)
        )
        self.bias = new_parameter(out_features, loader=default_weight_loader) if bias else None
        self.fp8 = None
        if fp8 is not None:
            create_fp8_params(self, fp8, out_features, None)

    def weight_loader(self, param: nn.Parameter, source: Any, shard_id: Any = None) -> None:
        del shard_id
        cols = param.shape[1]
        copy_checked(param, read_narrow(source, 1, self.tp_rank * cols, cols))

    def finish_loading(self) -> None:
        if self.fp8 is not None:
            finish_fp8_loading(self, self.tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8 is not None:
            y = fp8_forward(self, x)
        elif self.tp_size == 1:
            return F.linear(x, self.weight, self.bias)
        else:
            y = F.linear(x, self.weight)
        y = self.tp_group.all_reduce(y)
        return y if self.bias is None else y + self.bias
