"""Weight sources for loaders: an in-memory tensor or a lazy safetensors slice (both have
a shape and support slicing).

A loader asks only for the part it keeps (its tensor-parallel shard), so each rank reads only
its shard from disk.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def new_parameter(*shape: int, loader: Any, dtype: torch.dtype | None = None) -> nn.Parameter:
    """An uninitialised frozen parameter that checkpoint loading fills through ``loader``."""
    param = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param


def source_shape(source: Any) -> tuple[int, ...]:
    if isinstance(source, torch.Tensor):
        return tuple(source.shape)
    return tuple(source.get_shape())


def read_narrow(source: Any, dim: int, start: int, length: int) -> torch.Tensor:
    """``source.narrow(dim, start, length)``, reading only those rows of a lazy slice."""
    if isinstance(source, torch.Tensor):
        return source.narrow(dim, start, length)
    index = [slice(None)] * len(source_shape(source))
    index[dim] = slice(start, start + length)
    return source[tuple(index)]


def read_all(source: Any) -> torch.Tensor:
    if isinstance(source, torch.Tensor):
        return source
    return source[...]  # also a 0-dim tensor (a per-tensor scale), which ``[:]`` refuses


def copy_checked(param: torch.Tensor, loaded: torch.Tensor, name: str = "") -> None:
    if param.dtype == torch.float8_e4m3fn and loaded.dtype != param.dtype:
        raise ValueError(
            f"checkpoint tensor {name or ''} is {loaded.dtype}, the fp8 checkpoint's weights "
            "must be float8_e4m3fn (a checkpoint saved uncompressed is not an fp8 checkpoint)"
        )
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(
            f"checkpoint tensor {name or ''} has shape {tuple(loaded.shape)}, "
            f"the model expects {tuple(param.shape)}"
        )
    param.data.copy_(loaded)


def default_weight_loader(param: torch.nn.Parameter, source: Any, shard_id: Any = None) -> None:
    """Replicated parameter: the whole tensor, same on every rank."""
    del shard_id
    copy_checked(param, read_all(source))
