"""One device's worker: loads its model shard, sizes and owns its slice of the KV pool, and
runs steps through its model runner."""

from __future__ import annotations

import gc
import logging
import time

import torch

from ..config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from ..host_timing import HostTimer, merge_reports
from ..layers import ops
from ..layers.fp8_linear import check_small_batch_gemm
from ..long_lived_heap import thaw_long_lived_heap
from ..messages import SchedulerOutput
from ..models.loader import load_model
from .draft_proposer import DraftProposer
from .model_runner import ModelRunner
from .step_result import StepResult

logger = logging.getLogger(__name__)


class Worker:
    """Rank ``rank`` of the tensor-parallel group (the group must already be initialised;
    at TP=1 there is nothing to initialise). On CUDA rank ``r`` uses GPU ``r``."""

    def __init__(self, config: EngineConfig, rank: int = 0) -> None:
        self.config = config
        self.rank = rank
        self.device = config.device
        if self.device.type == "cuda":
            self.device = torch.device("cuda", rank)
            torch.cuda.set_device(self.device)
            # An engine that failed or was dropped earlier in this process may still hold
            # the card through reference cycles: collect them before loading.
            gc.collect()
            torch.cuda.empty_cache()
        torch.manual_seed(config.model.seed)
        started = time.perf_counter()
        rss_before = current_rss_bytes()
        kv_fp8 = config.cache.kv_cache_dtype == "fp8"
        self.model = load_model(config.model, self.device, kv_fp8=kv_fp8)
        #: The draft model of speculative decoding, or None.
        self.draft_model = (
            load_model(config.draft, self.device, kv_fp8=kv_fp8) if config.draft else None
        )
        self.load_report = {
            "rank": rank,
            "seconds": time.perf_counter() - started,
            "rss_before_bytes": rss_before,
            "peak_rss_bytes": peak_rss_bytes(),
            "param_bytes": parameter_bytes(self.model) + parameter_bytes(self.draft_model),
        }
        logger.info(
            "loaded %s (%s, %s) in %.1f s; %.0f MiB of parameters; peak host memory %.0f MiB "
            "(%.0f MiB before loading)",
            config.model.path,
            config.model.arch.architecture,
            config.model.dtype,
            self.load_report["seconds"],
            self.load_report["param_bytes"] / 2**20,
            self.load_report["peak_rss_bytes"] / 2**20,
            rss_before / 2**20,
        )
        drafter = None
        if self.draft_model is not None:
            sched = config.scheduler
            drafter = DraftProposer(
                self.draft_model, config.cache.block_size, self.device,
                max_pass_tokens=sched.max_num_batched_tokens + sched.max_num_seqs,
            )  # fmt: skip
            logger.info(
                "draft model %s (%s): %.0f MiB of parameters",
                config.draft.path,
                config.draft.arch.architecture,
                parameter_bytes(self.draft_model) / 2**20,
            )
        self.model_runner = ModelRunner(
            config, self.model, self.device, is_driver=rank == 0, drafter=drafter
        )
        #: The worker process's own phases (receiving plans); unused on rank 0.
        self.host_timer = HostTimer()
        self.key_caches: list[torch.Tensor] = []
        self.value_caches: list[torch.Tensor] = []

    def shutdown(self) -> None:
        """Give this rank's device memory back at once, not whenever the collector gets to
        it: CUDA graphs first (they hold captured collectives), then the KV pool and the
        weights. The worker runs no step afterwards. Idempotent."""
        if self.model is None:
            return  # shut down already
        runner = self.model_runner
        if runner is not None and runner.step_graphs is not None:
            runner.step_graphs.release()
        if runner is not None and runner.drafter is not None:
            runner.drafter.release()
        self.model_runner = runner = None
        self.key_caches, self.value_caches = [], []
        self.model = self.draft_model = None
        # Modules sit in reference cycles (parameters' bound weight loaders), and the heap
        # may be frozen (long_lived_heap): thawed, so this collection reaches them.
        thaw_long_lived_heap()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def get_host_timing(self) -> dict[str, dict[str, float]]:
        """This rank's host time by phase: the model runner's, and the worker loop's (set
        by the worker process) on ranks > 0."""
        return merge_reports(self.host_timer.report(), self.model_runner.host_timer.report())

    def get_load_report(self) -> dict[str, float]:
        """Time, parameter bytes and host memory (before, peak) of loading this rank."""
        return dict(self.load_report)

    @property
    def kv_heads_per_rank(self) -> int:
        return self.model.attention_layers()[0].num_kv_heads

    def bytes_per_block(self) -> int:
        """KV bytes of one block across all layers of this rank (keys and values): the
        config's :attr:`~metroline.engine.config.EngineConfig.kv_bytes_per_block`, the one
        formula that the start-up checks use too."""
        return self.config.kv_bytes_per_block

    def determine_num_blocks(self) -> int:
        """From ``kv_cache_memory_bytes`` when given (or on CPU), else by profiling."""
        budget = self.config.cache.kv_cache_memory_bytes
        if budget is None:
            budget = (
                self._profile_free_bytes()
                if self.device.type == "cuda"
                else DEFAULT_CPU_KV_CACHE_BYTES
            )
        num_blocks = budget // self.bytes_per_block()
        logger.info(
            "KV pool: %d blocks of %d tokens (%.2f GiB)",
            num_blocks,
            self.config.cache.block_size,
            num_blocks * self.bytes_per_block() / 1024**3,
        )
        return num_blocks

    def _profile_free_bytes(self) -> int:
        # Engines dropped earlier in this process were collected before loading (__init__).
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        self.model_runner.profile_run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        graphs = self.model_runner.graph_pool_reserve(peak - before)
        free, total = torch.cuda.mem_get_info()
        non_torch = (total - free) - torch.cuda.memory_reserved()
        budget = int(total * self.config.cache.gpu_memory_utilization) - peak - max(non_torch, 0)
        budget -= graphs
        logger.info(
            "memory profile: total %.2f GiB, peak torch %.2f GiB, other %.2f GiB, mixed-step "
            "graphs %.2f GiB, KV budget %.2f GiB",
            total / 1024**3,
            peak / 1024**3,
            non_torch / 1024**3,
            graphs / 1024**3,
            budget / 1024**3,
        )
        torch.cuda.empty_cache()
        if budget <= 0:
            raise ValueError(
                "no GPU memory left for the KV cache after loading the model and a profiling "
                f"pass at max_num_batched_tokens={self.config.scheduler.max_num_batched_tokens}; "
                "raise gpu_memory_utilization, lower max_num_batched_tokens, or use more GPUs"
            )
        return budget

    def initialize_cache(self, num_blocks: int) -> None:
        """Bind ``num_blocks`` blocks of KV to every attention layer, the draft model's too
        (same block ids, tensors of its own shape)."""
        self.key_caches, self.value_caches = [], []
        models = [m for m in (self.model, self.draft_model) if m is not None]
        for model in models:
            layers = model.attention_layers()
            head_dim = layers[0].head_dim
            shape = (num_blocks, self.config.cache.block_size, layers[0].num_kv_heads, head_dim)
            for layer in layers:
                # Zeroed so that masked-out reads of never-written slots can never be NaN.
                key_cache = torch.zeros(shape, dtype=self.config.kv_cache_dtype, device=self.device)
                value_cache = torch.zeros_like(key_cache)
                layer.bind_kv_cache(key_cache, value_cache)
                self.key_caches.append(key_cache)
                self.value_caches.append(value_cache)
        if self.device.type == "cuda":
            draft = self.config.draft
            if self.config.model.quantization or (draft is not None and draft.quantization):
                self._choose_small_batch_fp8_gemm()
            for model in models:  # compile now what serving would compile at its first steps
                layer = model.attention_layers()[0]
                ops.warm_up_kernels(
                    layer.key_cache,
                    layer.value_cache,
                    layer.num_heads,
                    self.config.scheduler.max_num_batched_tokens,
                    query_dtype=self.config.model.dtype,
                    k_scale=layer.k_scale,
                    v_scale=layer.v_scale,
                )
            if not self.config.enforce_eager:
                self.model_runner.capture_cuda_graphs()

    def _choose_small_batch_fp8_gemm(self) -> None:
        """Decode-sized fp8 matmuls take the Triton kernel that streams the weight if it
        compiles and agrees with the emulated product on every fp8 weight shape here; else
        the library GEMM, with the reason logged (the choice is the process's: a draft
        model's shapes are checked too)."""
        models = [m for m in (self.model, self.draft_model) if m is not None]
        problem = next(
            (p for m in models if (p := check_small_batch_gemm(m, self.config.model.dtype))),
            None,
        )
        ops.use_small_batch_fp8_gemm(problem is None)
        if problem is None:
            logger.info("fp8: decode-sized matmuls use the Triton small-batch kernel")
        else:
            logger.warning(
                "fp8: the small-batch kernel failed its check (%s); using cuBLASLt", problem
            )

    def execute_model_async(self, scheduled: SchedulerOutput) -> StepResult:
        """Launch one step; its tokens come from the result's ``result()``."""
        return self.model_runner.execute_model_async(scheduled)


def parameter_bytes(model: torch.nn.Module | None) -> int:
    """Bytes of ``model``'s parameters (0 for no model)."""
    if model is None:
        return 0
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _proc_status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (Linux) in bytes, or 0 where unknown."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def current_rss_bytes() -> int:
    """Resident set size of this process now."""
    return _proc_status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process image. ``VmHWM``, not ``getrusage``: the
    latter's maximum survives exec, so a spawned worker would report its parent's peak."""
    return _proc_status_bytes("VmHWM")
