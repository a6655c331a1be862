"""Every knob of the engine in one flat dataclass, shared by ``LLM`` and the command line."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metroline.engine.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    resolve_device,
)


@dataclass
class EngineArgs:
    model: str
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    kv_cache_memory_bytes: int | None = None
    dtype: str | torch.dtype = "auto"
    load_format: str = "auto"
    enforce_eager: bool = False
    async_scheduling: bool | None = None
    mixed_step_graphs: bool | None = None
    seed: int = 0
    device: str = "auto"

    def create_config(self) -> EngineConfig:
        """Validate everything and resolve "auto" values; raises ``ValueError`` on bad input."""
        model = ModelConfig.create(
            self.model,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            load_format=self.load_format,
            seed=self.seed,
        )
        return EngineConfig(
            model=model,
            cache=CacheConfig(
                block_size=self.block_size,
                gpu_memory_utilization=self.gpu_memory_utilization,
                enable_prefix_caching=self.enable_prefix_caching,
                kv_cache_memory_bytes=self.kv_cache_memory_bytes,
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
        )
