"""The engine's settings: :class:`EngineArgs`, the one home of every knob's default, type and
help (the command line's flags and ``LLM(**kwargs)`` are generated from it), and the frozen
:class:`EngineConfig` it resolves into, checked on construction.

Values that are only known at run time (the number of KV blocks) are not stored here; they
live with the component that discovers them (the worker, then the KV cache manager). torch is
imported only to resolve a config, so the command line loads without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .checkpoint import ModelArchConfig
from .flags import knob
from .model_config import LOAD_FORMATS, ModelConfig, draft_model_config, resolve_dtype
from .quantization import (
    KV_CACHE_DTYPES,
    QUANTIZATION_METHODS,
    check_fp8_device,
    resolve_kv_cache_dtype,
)
from .spec_decode.config import SpeculativeConfig, check_speculation, parse_speculative_config

__all__ = [
    "BLOCK_SIZES",
    "DEFAULT_CPU_KV_CACHE_BYTES",
    "LOAD_FORMATS",
    "SERVING_DEFAULTS",
    "CacheConfig",
    "EngineArgs",
    "EngineConfig",
    "ModelConfig",
    "ParallelConfig",
    "SchedulerConfig",
    "resolve_device",
    "resolve_dtype",
]

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch

BLOCK_SIZES = (8, 16, 32, 64, 128)
#: Where ``metroline serve`` defaults differ from ``LLM()``'s (the EngineArgs fields): a
#: smaller token budget bounds how long one step's prompt chunks delay every running
#: stream's next token, where offline work only wants the most tokens per second.
SERVING_DEFAULTS = {"max_num_batched_tokens": 8192}
#: KV pool on CPU when the caller gives no byte budget.
DEFAULT_CPU_KV_CACHE_BYTES = 512 * 1024**2


def resolve_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda'; got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available")
    return torch.device(device)


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV pool: block size, and how much memory it may take."""

    block_size: int
    gpu_memory_utilization: float
    enable_prefix_caching: bool
    #: Size of the KV pool in bytes; on CUDA it overrides profiling.
    kv_cache_memory_bytes: int | None
    #: "auto" (the model dtype) or "fp8" (e4m3 with per-layer scales).
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "kv_cache_dtype", resolve_kv_cache_dtype(self.kv_cache_dtype))
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

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int

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
    #: These three as in :class:`EngineArgs`.
    enforce_eager: bool
    async_scheduling: bool | None
    mixed_step_graphs: bool | None
    #: Speculative decoding, or None (off).
    speculative: SpeculativeConfig | None = None
    #: The draft model, present exactly when ``speculative.method`` is ``draft_model``.
    draft: ModelConfig | None = None

    def __post_init__(self) -> None:
        self.parallel.check_model(self.model.arch)
        if self.speculative is not None:
            check_speculation(self.speculative, self.async_scheduling)
        drafting = self.speculative is not None and self.speculative.method == "draft_model"
        if drafting != (self.draft is not None):
            raise ValueError(
                "EngineConfig.draft (the draft model's ModelConfig) must be given exactly "
                "when speculative.method is 'draft_model'"
            )
        if self.draft is not None:
            try:
                self.parallel.check_model(self.draft.arch)
            except ValueError as error:
                raise ValueError(f"the draft model: {error}") from None
        check_fp8_device(self.device, self.model.quantization, self.cache.kv_cache_dtype)
        if self.draft is not None:
            check_fp8_device(self.device, self.draft.quantization, self.cache.kv_cache_dtype)
        if self.scheduler.max_model_len != self.model.max_model_len:
            raise ValueError("scheduler.max_model_len must equal model.max_model_len")
        self._check_kv_budget()

    @property
    def kv_bytes_per_block(self) -> int:
        """KV bytes of one block on one rank, keys and values of every layer of the model and
        of the draft model if any (a rank holds ``kv_heads / tp`` KV heads, or one when TP
        exceeds them)."""
        tp = self.parallel.tensor_parallel_size
        per_token = 0
        for model in (self.model, self.draft):  # a draft model's layers share the blocks
            if model is not None:
                arch = model.arch
                kv_heads = max(1, arch.num_key_value_heads // tp)
                per_token += 2 * arch.num_hidden_layers * kv_heads * arch.head_dim
        return per_token * self.cache.block_size * self.kv_cache_dtype.itemsize

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        """Element type of the KV pool: the model dtype, or float8_e4m3fn."""
        import torch

        return torch.float8_e4m3fn if self.cache.kv_cache_dtype == "fp8" else self.model.dtype

    def _check_kv_budget(self) -> None:
        """A given ``kv_cache_memory_bytes`` must hold one sequence of max_model_len tokens:
        checked here, before any process starts, instead of by the engine core once loaded."""
        budget = self.cache.kv_cache_memory_bytes
        if budget is None:
            return
        block_size = self.cache.block_size
        needed_blocks = -(-self.model.max_model_len // block_size)
        needed = needed_blocks * self.kv_bytes_per_block
        if budget < needed:
            tokens = budget // self.kv_bytes_per_block * block_size
            raise ValueError(
                f"kv_cache_memory_bytes={budget} holds {tokens} tokens, less than one sequence "
                f"of max_model_len={self.model.max_model_len}, which needs {needed} bytes; raise "
                "kv_cache_memory_bytes (--kv-cache-memory-bytes) or lower max_model_len"
            )


@dataclass
class EngineArgs:
    """Every knob of the engine, flat. ``LLM(model, **kwargs)`` takes these fields, ``metroline
    serve`` has one flag per field (see :mod:`metroline.engine.flags`), the benchmarks reuse
    the same flags; the numeric defaults are the ones measured best on our target GPU."""

    model: str = field(
        metadata={"help": "checkpoint directory, or a Hugging Face model id (org/name)"}
    )
    revision: str | None = knob(None, "branch, tag or commit of a Hugging Face model id")
    tokenizer: str | None = knob(None, "folder of the tokenizer files (default: the model's)")
    trust_remote_code: bool = knob(
        False,
        "accepted for vLLM compatibility: no code from a checkpoint ever runs (true is an "
        "error unless the architecture is implemented natively)",
    )
    generation_config: str = knob(
        "auto",
        "default sampling parameters: auto (the model's generation_config.json), vllm "
        "(none) or a folder holding a generation_config.json",
    )
    tensor_parallel_size: int = knob(1, "GPUs (ranks) the model is split across", aliases=("-tp",))
    max_model_len: int | None = knob(
        None, "longest prompt plus output in tokens (default: the model's limit)"
    )
    gpu_memory_utilization: float = knob(
        0.9, "fraction of GPU memory for weights, activations and the KV pool"
    )
    block_size: int = knob(16, f"tokens per KV-cache block, one of {BLOCK_SIZES}")
    max_num_seqs: int = knob(1024, "most sequences in one step")
    max_num_batched_tokens: int = knob(
        16384,
        "token budget of one step (metroline serve's default: "
        f"{SERVING_DEFAULTS['max_num_batched_tokens']})",
    )
    enable_prefix_caching: bool = knob(True, "reuse the KV blocks of shared prefixes")
    kv_cache_memory_bytes: int | None = knob(
        None,
        "bytes of the KV pool (on CUDA it overrides profiling; default on CPU "
        f"{DEFAULT_CPU_KV_CACHE_BYTES // 2**20} MiB)",
    )
    dtype: str | torch.dtype = knob("auto", "auto (the checkpoint's), float32, bfloat16 or float16")
    quantization: str | None = knob(
        None,
        "fp8: quantize the projections' weights at load (one scale per output channel) and "
        "their inputs per token; unset: as the checkpoint says (fp8 checkpoints load as such)",
        aliases=("-q",),
        choices=QUANTIZATION_METHODS,
    )
    kv_cache_dtype: str = knob(
        "auto",
        "auto (the model dtype) or fp8 (e4m3, scales from the checkpoint or 1.0): twice the "
        "tokens in the same memory",
        choices=KV_CACHE_DTYPES,
    )
    load_format: str = knob("auto", "auto, safetensors or dummy (random weights)")
    enforce_eager: bool = knob(False, "run every step eagerly (no CUDA graphs)")
    async_scheduling: bool | None = knob(
        None,
        "plan and launch each step while the previous one still runs (default: on for CUDA; "
        "on the CPU the device work runs inline, so there is nothing to overlap)",
    )
    mixed_step_graphs: bool | None = knob(
        None,
        "CUDA graphs also for steps with prompt chunks, up to 4096 tokens (default: on at "
        "tensor-parallel size 2 or more, where the host bounds those steps)",
    )
    speculative_config: str | None = knob(
        None, 'speculative decoding as JSON (vLLM\'s spelling): {"method": "ngram", '
        '"num_speculative_tokens": K, "prompt_lookup_min": a, "prompt_lookup_max": b} or '
        '{"method": "draft_model", "model": PATH, "num_speculative_tokens": K}',
    )  # fmt: skip
    seed: int = knob(0, "seed of the random number generator (dummy weights, unseeded sampling)")
    device: str = knob("auto", "auto, cpu or cuda")

    def create_config(self) -> EngineConfig:
        """Validate everything and resolve "auto" values; raises ``ValueError`` on bad input."""
        model = ModelConfig.create(
            self.model,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            load_format=self.load_format,
            seed=self.seed,
            revision=self.revision,
            tokenizer=self.tokenizer,
            trust_remote_code=self.trust_remote_code,
            generation_config=self.generation_config,
            quantization=self.quantization,
        )
        speculative = parse_speculative_config(self.speculative_config)
        drafts = speculative is not None and speculative.method == "draft_model"
        return EngineConfig(
            model=model,
            cache=CacheConfig(
                block_size=self.block_size,
                gpu_memory_utilization=self.gpu_memory_utilization,
                enable_prefix_caching=self.enable_prefix_caching,
                kv_cache_memory_bytes=self.kv_cache_memory_bytes,
                kv_cache_dtype=self.kv_cache_dtype,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=self.max_num_batched_tokens,
                max_model_len=model.max_model_len,
            ),
            parallel=ParallelConfig(tensor_parallel_size=self.tensor_parallel_size),
            device=resolve_device(self.device),
            enforce_eager=self.enforce_eager,
            async_scheduling=self.async_scheduling,
            mixed_step_graphs=self.mixed_step_graphs,
            speculative=speculative,
            draft=draft_model_config(speculative.model, model) if drafts else None,
        )
