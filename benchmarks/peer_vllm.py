"""The vLLM peer for the offline benchmarks: the same prompts, the same warm-up rule.

vLLM runs at its own defaults unless ``--vllm-arg KEY=VALUE`` overrides an ``LLM(...)``
argument (``max_num_seqs=256``, ``max_num_batched_tokens=8192`` for the equal-settings run).
Only what the workload fixes is always passed: the shape, dummy weights, the dtype, the
longest sequence, prefix caching on, the tensor-parallel size and the seed. vLLM is imported
only here, so the other backends run without it (the GPU machine gets it from
``peer-vllm-bundle.sh``'s bundle, see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from typing import Any

from workloads import Workload, make_workload


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["max_num_seqs=256", "enforce_eager=true"]`` -> ``{"max_num_seqs": 256, ...}``;
    a value is JSON when it parses as JSON, else the string itself."""
    overrides: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--vllm-arg takes KEY=VALUE; got {item!r}")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return overrides


def vllm_engine_kwargs(shape_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The ``vllm.LLM`` arguments: what the workload fixes (our fp8 flags included: both
    engines then quantize the same way, in vLLM's spelling), then the overrides."""
    fp8 = {}
    if getattr(args, "quantization", None) is not None:
        fp8["quantization"] = args.quantization
    if getattr(args, "kv_cache_dtype", "auto") != "auto":
        fp8["kv_cache_dtype"] = args.kv_cache_dtype
    return (
        {
            "model": str(shape_dir),
            "load_format": "dummy",
            "dtype": args.dtype,
            "max_model_len": args.max_model_len,
            "enable_prefix_caching": True,
            "tensor_parallel_size": args.tensor_parallel_size,
            "seed": 0,
            "skip_tokenizer_init": True,
        }
        | fp8
        | parse_overrides(args.vllm_arg)
    )


def _settings(llm: Any) -> dict[str, Any]:
    """The scheduler and graph settings vLLM resolved (its defaults depend on the card)."""
    config = llm.llm_engine.vllm_config
    compilation = config.compilation_config
    sizes = getattr(compilation, "cudagraph_capture_sizes", None) or []
    return {
        "max_num_seqs": config.scheduler_config.max_num_seqs,
        "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
        "block_size": config.cache_config.block_size,
        "num_gpu_blocks": config.cache_config.num_gpu_blocks,
        "gpu_memory_utilization": config.cache_config.gpu_memory_utilization,
        "cudagraph_max_size": max(sizes) if sizes else 0,
        "enforce_eager": config.model_config.enforce_eager,
    }


def run_vllm(
    shape_dir: Path, workload: Workload, vocab_size: int, args: argparse.Namespace
) -> dict[str, Any]:
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = vllm_engine_kwargs(shape_dir, args)
    started = time.perf_counter()
    llm = LLM(**kwargs)
    init_s = time.perf_counter() - started

    def params(lens: list[int], temperature: float) -> list[Any]:
        return [
            SamplingParams(
                temperature=temperature, max_tokens=n, ignore_eos=True, seed=i, detokenize=False
            )
            for i, n in enumerate(lens)
        ]

    warm = make_workload(workload.name, vocab_size, 16, seed=1)
    llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in warm.prompts],
        params(warm.output_lens, 0.0),
        use_tqdm=False,
    )
    prompts = [TokensPrompt(prompt_token_ids=p) for p in workload.prompts]
    started = time.perf_counter()
    outputs = llm.generate(
        prompts, params(workload.output_lens, workload.temperature), use_tqdm=False
    )
    elapsed = time.perf_counter() - started
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert produced == workload.num_output_tokens, (produced, workload.num_output_tokens)
    settings = _settings(llm)
    result = {
        "version": vllm.__version__,
        "init_s": init_s,
        "elapsed_s": elapsed,
        "engine_kwargs": {k: v for k, v in kwargs.items() if k != "model"},
        "settings": settings,
        "kv_tokens": (settings["num_gpu_blocks"] or 0) * settings["block_size"],
        # Device-wide (vLLM's engine runs in a child process): its pool and weights.
        "gpu_memory_in_use_gib": (lambda free, total: (total - free) / 2**30)(
            *torch.cuda.mem_get_info()
        ),
    }
    del llm, outputs
    gc.collect()
    return result
