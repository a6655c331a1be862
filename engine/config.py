"""Frozen engine configuration, checked on construction.

Values that are only known at run time (the number of KV blocks) are not stored here; they
live with the component that discovers them (the worker, then the KV cache manager).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from metroline.engine.hf_config import ModelArchConfig, load_arch_config

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}
BLOCK_SIZES = (8, 16, 32, 64, 128)
LOAD_FORMATS = ("auto", "safetensors", "dummy")
#: KV pool on CPU when the caller gives no byte budget.
DEFAULT_CPU_KV_CACHE_BYTES = 512 * 1024**2


def resolve_dtype(dtype: str | torch.dtype, checkpoint_dtype: str | None) -> torch.dtype:
    """``"auto"`` takes the checkpoint's declared dtype (float32 when it declares none)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be one of float32, bfloat16, float16; got {dtype}")
        return dtype
    if dtype == "auto":
        dtype = checkpoint_dtype or "float32"
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16'; got {dtype!r}")
    return _DTYPES[dtype]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda'; got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available")
    return torch.device(device)


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint, in which precision, up to which sequence length."""

    path: Path
    arch: ModelArchConfig
    dtype: torch.dtype
    max_model_len: int
    load_format: str
    seed: int
    has_tokenizer: bool

    @classmethod
    def create(
        cls,
        model: str | Path,
        dtype: str | torch.dtype = "auto",
        max_model_len: int | None = None,
        load_format: str = "auto",
        seed: int = 0,
    ) -> ModelConfig:
        path = Path(model)
        if not path.is_dir():
            raise ValueError(f"model must be a local checkpoint directory; {model!s} is not one")
        if load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}; got {load_format!r}")
        arch = load_arch_config(path)
        if load_format != "dummy" and not any(path.glob("*.safetensors")):
            raise ValueError(
                f"no *.safetensors files in {path}; pass load_format='dummy' for random weights"
            )
        limit = arch.max_position_embeddings
        if max_model_len is None:
            max_model_len = limit
        elif not isinstance(max_model_len, int) or max_model_len < 1:
            raise ValueError(f"max_model_len must be a positive integer; got {max_model_len!r}")
        elif max_model_len > limit:
            raise ValueError(
                f"max_model_len ({max_model_len}) exceeds the model's max_position_embeddings "
                f"({limit})"
            )
        if arch.sliding_window is not None and max_model_len > arch.sliding_window:
            # Within the window, sliding-window attention equals full attention, so capping
            # the length keeps results exact without a windowed kernel.
            logger.warning(
                "model uses a sliding attention window of %d tokens: max_model_len capped "
                "from %d to %d",
                arch.sliding_window,
                max_model_len,
                arch.sliding_window,
            )
            max_model_len = arch.sliding_window
        has_tokenizer = any(
            (path / name).is_file()
            for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
        )
        return cls(
            path=path,
            arch=arch,
            dtype=resolve_dtype(dtype, arch.dtype),
            max_model_len=max_model_len,
            load_format=load_format,
            seed=seed,
            has_tokenizer=has_tokenizer,
        )


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV pool: block size, and how much memory it may take."""

    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    #: Size of the KV pool in bytes; on CUDA it overrides profiling.
    kv_cache_memory_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}; got {self.block_size!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1]; got {self.gpu_memory_utilization!r}"
            )
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(
                f"kv_cache_memory_bytes must be positive; got {self.kv_cache_memory_bytes!r}"
            )


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step limits of continuous batching."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        tp = self.tensor_parallel_size
        if not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer; got {tp!r}")

    def check_model(self, arch: ModelArchConfig) -> None:
        """Raise before any process starts if the model cannot be split ``tp`` ways."""
        tp = self.tensor_parallel_size
        problems = []
        if arch.num_attention_heads % tp:
            problems.append(f"num_attention_heads ({arch.num_attention_heads})")
        if arch.intermediate_size % tp:
            problems.append(f"intermediate_size ({arch.intermediate_size})")
        kv = arch.num_key_value_heads
        if (kv % tp) if kv >= tp else (tp % kv):
            problems.append(f"num_key_value_heads ({kv}, or TP a multiple of it)")
        if problems:
            raise ValueError(
                f"tensor_parallel_size={tp} does not divide "
                + ", ".join(problems)
                + "; choose a TP degree that divides them"
            )


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    device: torch.device
    #: Run every step eagerly (no CUDA graphs).
    enforce_eager: bool = False
    #: Plan and launch step N+1 while step N runs (see EngineCore). None: on for CUDA (any TP
    #: size); on the CPU the device work runs inline, so there is nothing to overlap.
    async_scheduling: bool | None = None
    #: CUDA graphs also for steps with prompt chunks, up to 4096 tokens (see cuda_graphs.py).
    #: None: on at TP >= 2, where the host bounds those steps. Ignored with enforce_eager.
    mixed_step_graphs: bool | None = None

    def __post_init__(self) -> None:
        self.parallel.check_model(self.model.arch)
        if self.scheduler.max_model_len != self.model.max_model_len:
            raise ValueError("scheduler.max_model_len must equal model.max_model_len")
