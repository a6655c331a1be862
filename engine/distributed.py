"""Tensor-parallel process group. At TP=1 every collective is the identity.

Layers capture the current group when they are built (:func:`get_tp_group`) and call its
collectives in ``forward``; each TP process calls :func:`init_distributed` before building
its model. Ranks meet through a TCP store on an ephemeral port chosen by rank 0 (no fixed
ports, no files): two engines on one machine never collide.
"""

from __future__ import annotations

import datetime
import logging
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

#: Longest a collective may wait before the group is declared dead.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group, in place; returns it."""
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise maximum of ``x`` over the group, in place; returns it."""
        if self.world_size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x`` into every rank's ``x`` (same shape and dtype), in place; on CUDA
        ordered on the current stream, no host synchronisation."""
        if self.world_size > 1:
            dist.broadcast(x, src=0, group=self.group)
        return x

    def gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
        """Concatenate every rank's ``x`` along ``dim`` on rank 0; other ranks get None."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=0, group=self.group)
        return torch.cat(parts, dim=dim) if parts is not None else None


_group = TensorParallelGroup()


def get_tp_group() -> TensorParallelGroup:
    return _group


def get_tp_rank() -> int:
    return _group.rank


def get_tp_size() -> int:
    return _group.world_size


def create_store(world_size: int) -> tuple[dist.TCPStore, int]:
    """Rank 0's rendezvous store, bound to a free port on the loopback interface."""
    store = dist.TCPStore(
        "127.0.0.1",
        0,
        world_size,
        is_master=True,
        wait_for_workers=False,
        timeout=COLLECTIVE_TIMEOUT,
    )
    return store, store.port


def init_distributed(
    rank: int, world_size: int, backend: str, port: int, store: dist.TCPStore | None = None
) -> TensorParallelGroup:
    """Join the TP group (rank 0 passes the store it created) and make it current."""
    global _group
    if world_size == 1:
        _group = TensorParallelGroup()
        return _group
    if dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is already initialised in this process; one tensor-parallel "
            "engine per process"
        )
    if store is None:
        store = dist.TCPStore(
            "127.0.0.1", port, world_size, is_master=False, timeout=COLLECTIVE_TIMEOUT
        )
    options = {}
    if backend == "nccl":
        options["device_id"] = torch.device("cuda", rank)
    dist.init_process_group(
        backend,
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT,
        **options,
    )
    _group = TensorParallelGroup(rank, world_size, dist.group.WORLD)
    return _group


#: Longest the group's teardown may take before this process moves on without it.
DESTROY_TIMEOUT_S = 30.0


def destroy_distributed() -> None:
    """Leave the group. Teardown runs in a helper thread so that a peer that died first can
    never hang this process; after ``DESTROY_TIMEOUT_S`` it is abandoned with a warning."""
    global _group
    _group = TensorParallelGroup()
    if not dist.is_initialized():
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    teardown = threading.Thread(target=dist.destroy_process_group, daemon=True)
    teardown.start()
    teardown.join(DESTROY_TIMEOUT_S)
    if teardown.is_alive():
        logger.warning("process-group teardown did not finish in %.0f s", DESTROY_TIMEOUT_S)
