"""Linear layers split across tensor-parallel ranks. At TP=1 each is a plain linear layer.

- :class:`ColumnParallelLinear` splits the output features (rank ``r`` holds rows
  ``r*out/tp : (r+1)*out/tp`` of the weight); :class:`MergedColumnParallelLinear` packs
  several such outputs (gate and up), :class:`QKVParallelLinear` packs q, k and v heads.
- :class:`RowParallelLinear` splits the input features and all-reduces the partial sums.

Every parameter carries ``weight_loader(param, source, shard_id)`` that copies its rank's
shard out of a checkpoint tensor, so loading needs no sharding framework.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import get_tp_group, get_tp_rank, get_tp_size
from .weights import copy_checked, default_weight_loader, read_narrow


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by TP size {denominator}")
    return numerator // denominator


def _parameter(*shape: int, loader: Any) -> nn.Parameter:
    param = nn.Parameter(torch.empty(*shape), requires_grad=False)
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param


class ColumnParallelLinear(nn.Module):
    """``y_local = x W_local^T``: each rank computes a slice of the output features."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.out_features_per_rank = _divide(out_features, self.tp_size, "output features")
        self.weight = _parameter(self.out_features_per_rank, in_features, loader=self.weight_loader)
        self.bias = (
            _parameter(self.out_features_per_rank, loader=self.weight_loader) if bias else None
        )

    def weight_loader(self, param: nn.Parameter, source: Any, shard_id: Any = None) -> None:
        del shard_id
        rows = param.shape[0]
        copy_checked(param, read_narrow(source, 0, self.tp_rank * rows, rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul; ``shard_id`` is the output's index."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(in_features, sum(output_sizes), bias)
        self.shard_sizes = [_divide(s, self.tp_size, "output features") for s in output_sizes]

    def weight_loader(self, param: nn.Parameter, source: Any, shard_id: Any = None) -> None:
        if shard_id is None:
            raise ValueError("a merged linear layer loads one shard at a time")
        size = self.shard_sizes[shard_id]
        offset = sum(self.shard_sizes[:shard_id])
        loaded = read_narrow(source, 0, self.tp_rank * size, size)
        copy_checked(param.data.narrow(0, offset, size), loaded)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul. Each rank holds whole heads: ``heads/tp`` query
    heads and ``kv_heads/tp`` KV heads, or one KV head replicated when ``tp > kv_heads``."""

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool
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
        super().__init__(hidden_size, out_per_rank * tp_size, bias)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def weight_loader(self, param: nn.Parameter, source: Any, shard_id: Any = None) -> None:
        if shard_id == "q":
            offset, size, start = 0, self.q_size, self.tp_rank * self.q_size
        elif shard_id == "k":
            offset, size, start = self.q_size, self.kv_size, self.kv_head_start * self.head_dim
        elif shard_id == "v":
            offset = self.q_size + self.kv_size
            size, start = self.kv_size, self.kv_head_start * self.head_dim
        else:
            raise ValueError(f"QKV shard id must be 'q', 'k' or 'v'; got {shard_id!r}")
        copy_checked(param.data.narrow(0, offset, size), read_narrow(source, 0, start, size))


class RowParallelLinear(nn.Module):
    """``y = sum_r x_r W_r^T + b``: each rank holds a slice of the input features."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.tp_group = get_tp_group()
        self.tp_rank, self.tp_size = self.tp_group.rank, self.tp_group.world_size
        self.in_features_per_rank = _divide(in_features, self.tp_size, "input features")
        self.weight = _parameter(out_features, self.in_features_per_rank, loader=self.weight_loader)
        self.bias = _parameter(out_features, loader=default_weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, source: Any, shard_id: Any = None) -> None:
        del shard_id
        cols = param.shape[1]
        copy_checked(param, read_narrow(source, 1, self.tp_rank * cols, cols))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.linear(x, self.weight, self.bias)
        y = self.tp_group.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias
