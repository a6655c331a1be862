"""Small helpers the kernel launchers share: tile-size arithmetic and device facts."""

from __future__ import annotations

import functools

import torch


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for n <= 1). Triton tiles must be powers of two;
    sizes that are not (head dim 80, 96) are padded up and masked."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a nominal 4 off CUDA (the interpreter)."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _num_sms(index)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: true fp32 ("ieee") for fp32 operands, so tf32 is never used
    silently; for 16-bit operands the choice is moot and "tf32" is Triton's default."""
    return "ieee" if dtype == torch.float32 else "tf32"


def row_major_last_dim(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dimension is contiguous (stride 1), else a contiguous copy.
    Kernels take the other strides as arguments but assume unit stride along the last dim."""
    return t if t.stride(-1) == 1 else t.contiguous()
