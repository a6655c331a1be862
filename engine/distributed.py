"""Tensor-parallel group state. At TP=1 every collective is the identity.

Layers ask this module for their rank and the group size when they are built, and call its
collectives in ``forward``; worker processes call :func:`init_tensor_parallel` before building
the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None


_group = TensorParallelGroup()


def init_tensor_parallel(rank: int, world_size: int, group: dist.ProcessGroup | None) -> None:
    global _group
    _group = TensorParallelGroup(rank, world_size, group)


def get_tp_rank() -> int:
    return _group.rank


def get_tp_size() -> int:
    return _group.world_size


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the group, in place; returns it."""
    if _group.world_size > 1:
        dist.all_reduce(x, group=_group.group)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (same shape on every rank)."""
    if _group.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_group.world_size)]
    dist.all_gather(parts, x.contiguous(), group=_group.group)
    return torch.cat(parts, dim=dim)
