"""One host-to-device copy for a step's small input arrays, through persistent pinned memory.

A step's inputs are a dozen small arrays (token ids, positions, slots, block tables, sampling
columns). Each is written straight into a pinned host buffer that lives as long as the
runner, at a 64-byte-aligned offset; one asynchronous copy moves the whole buffer to a
persistent device buffer, and each array is a typed view of its slice there. Through pinned
memory the copy never waits for the step still running on the device, which would undo the
overlap of asynchronous scheduling; one copy instead of a dozen saves their launches.

Invariants: there are two buffer sets, used in turn by the batches that reach
:meth:`StepStaging.to_device` (a batch abandoned before it, say because building a request's
inputs failed, leaves the turn unchanged); a set is written again only after an event
recorded behind its last copy has completed, so the host never overwrites bytes the device
has not read yet. With the engine's one step in flight that event has always completed, so
the wait costs nothing. Device views stay valid while the next batch runs and are
overwritten, in stream order, by the batch after it: whatever must outlive a step is copied
out (CUDA graphs copy their inputs into buffers of their own).

On the CPU there is nothing to copy: each array becomes a tensor of its own.
"""

from __future__ import annotations

import numpy as np
import torch

_ALIGN = 64


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype


class _BufferSet:
    def __init__(self) -> None:
        self.host: torch.Tensor | None = None  # pinned uint8
        self.device: torch.Tensor | None = None  # uint8
        self.copied: torch.cuda.Event | None = None


class StepStaging:
    """Collects arrays with :meth:`add`, then :meth:`to_device` returns them as device
    tensors, in the order added."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.uses_pinned = device.type == "cuda"
        self._sets = [_BufferSet(), _BufferSet()]
        self._turn = 0
        self._arrays: list[tuple[np.ndarray, torch.dtype]] = []

    def add(self, values: np.ndarray | list, dtype: torch.dtype) -> int:
        """Queue ``values`` (converted to ``dtype``); returns its index in the result."""
        array = np.ascontiguousarray(values, dtype=_numpy_dtype(dtype))
        self._arrays.append((array, dtype))
        return len(self._arrays) - 1

    def to_device(self) -> list[torch.Tensor]:
        queued, self._arrays = self._arrays, []
        if not self.uses_pinned:
            return [torch.from_numpy(array).to(self.device) for array, _ in queued]
        offsets, size = [], 0
        for array, _ in queued:
            offsets.append(size)
            size += -(-array.nbytes // _ALIGN) * _ALIGN
        turn = self._turn ^ 1
        buffers = self._sets[turn]
        if buffers.copied is not None:
            buffers.copied.synchronize()
        if buffers.host is None or buffers.host.numel() < size:
            capacity = max(4096, 1 << (max(size, 1) - 1).bit_length())
            buffers.host = torch.empty(capacity, dtype=torch.uint8, pin_memory=True)
            buffers.device = torch.empty(capacity, dtype=torch.uint8, device=self.device)
            buffers.copied = None
        host = buffers.host.numpy()
        for (array, _), offset in zip(queued, offsets):
            host[offset : offset + array.nbytes] = array.reshape(-1).view(np.uint8)
        if size:
            buffers.device[:size].copy_(buffers.host[:size], non_blocking=True)
        if buffers.copied is None:
            buffers.copied = torch.cuda.Event()
        buffers.copied.record()
        self._turn = turn
        return [
            buffers.device[offset : offset + array.nbytes].view(dtype).view(array.shape)
            for (array, dtype), offset in zip(queued, offsets)
        ]
