"""Offline throughput: W1 (mixed), W2 (nano-vllm's shape), W4 (prefill) - benchmarks/README.md.

``python -P benchmarks/throughput.py --model llama3-8b --workload W1 [--backend hf|vllm] [-tp 2]``

Measures the card's copy bandwidth and bf16 matmul rate first, then runs the workload on
Metroline (``load_format="dummy"``), on transformers ``generate()`` with static,
left-padded batches (random init of the same config; only requested tokens are counted), or
on vLLM (:mod:`peer_vllm`, at its own defaults unless ``--vllm-arg KEY=VALUE``).
Prints one table last and writes a JSON file with the environment and every figure.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import copy_bandwidth, environment, fp8_matmul_flops, gpu_slug, matmul_flops
from peer_vllm import run_vllm
from records import save_record
from roofline import prefill_flops, w1_roofline_seconds
from shapes import SHAPES, weight_bytes, write_shape
from stall_diagnostics import gc_pauses, gpu_timeline, parse_window, step_window_profile
from workloads import Workload, make_workload

from metroline.engine.config import EngineArgs
from metroline.engine.flags import add_flags, flag_values

logger = logging.getLogger("throughput")

#: Engine settings the benchmark decides itself (random weights of a named shape).
ENGINE_FLAGS_FIXED = ("model", "load_format")


def run_metroline(shape_dir: Path, workload: Workload, args: argparse.Namespace) -> dict[str, Any]:
    from metroline.engine import LLM, SamplingParams
    from metroline.engine.layers.ops import compiled_kernel_variants

    started = time.perf_counter()
    llm = LLM(
        model=str(shape_dir),
        load_format="dummy",
        **flag_values(args, EngineArgs, skip=ENGINE_FLAGS_FIXED),
    )
    init_s = time.perf_counter() - started
    variants = compiled_kernel_variants()
    params = [
        SamplingParams(temperature=workload.temperature, max_tokens=n, ignore_eos=True, seed=i)
        for i, n in enumerate(workload.output_lens)
    ]
    # Warm up on other prompts of the workload's shape: a measured prompt already in the
    # prefix cache would skip its prefill (the first 16 of W4's 64 prompts once did).
    warm = make_workload(workload.name, SHAPES[args.model]["vocab_size"], 16, seed=1)
    warm_params = [
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in warm.output_lens
    ]
    llm.generate(warm.prompts, warm_params, use_tqdm=False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    warm_stats = llm.engine_core.stats()
    retries_before = torch.cuda.memory_stats().get("num_alloc_retries", 0)
    window = args.profile_steps
    with (
        gc_pauses() as collections,
        gpu_timeline(args.gpu_timeline) as timeline,
        step_window_profile(llm.engine_core, window, args.out / "step-window-profile.txt"),
    ):
        started = time.perf_counter()
        outputs = llm.generate(workload.prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
    # Kernels compiled after start-up (rank 0's process) are start-up work leaking into
    # serving: the engine's warm-up is meant to leave none.
    variants = compiled_kernel_variants() - variants
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert produced == workload.num_output_tokens, (produced, workload.num_output_tokens)
    core = llm.engine_core
    stats = core.stats()
    # Host time by phase on every rank, when METROLINE_HOST_TIMING=1 (warm-up included).
    host_timings = core.host_timings()
    # A bool, not the graphs: nothing may keep them alive past shutdown.
    mixed_graphs = bool(getattr(core.executor.worker.model_runner.step_graphs, "mixed_buckets", 0))
    steps = stats.num_steps - warm_stats.num_steps
    hits = stats.prefix_cache_hits - warm_stats.prefix_cache_hits
    if hits:
        logger.warning("%d prompt tokens of the measured run came from the prefix cache", hits)
    prefill_steps = stats.num_prefill_steps - warm_stats.num_prefill_steps
    result = {
        "init_s": init_s,
        "elapsed_s": elapsed,
        "async_scheduling": core.async_scheduling,
        "mixed_step_graphs": mixed_graphs,
        "kernels_compiled_after_start": variants,
        "host_timings": host_timings,
        # Allocator retries free cached blocks with a device synchronisation each.
        "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries_before,
        "gpu_timeline": timeline.get("summary"),
        "garbage_collections": collections,
        "kv_blocks": core.num_blocks,
        "kv_tokens": core.num_blocks * llm.config.cache.block_size,
        "num_preemptions": stats.num_preemptions - warm_stats.num_preemptions,
        "num_steps": steps,
        "prefix_cache_hit_tokens": hits,
        "num_prefill_steps": prefill_steps,
        "num_decode_steps": steps - prefill_steps,
        "mean_tokens_per_step": (stats.num_scheduled_tokens - warm_stats.num_scheduled_tokens)
        / max(1, steps),
        "mean_step_ms": elapsed / max(1, steps) * 1e3,
        "peak_gpu_memory_gib": torch.cuda.max_memory_reserved() / 2**30,
    }
    llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return result


def run_hf(shape_dir: Path, workload: Workload, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(shape_dir))
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    count = min(args.hf_max_requests or len(workload.prompts), len(workload.prompts))
    prompts, output_lens = workload.prompts[:count], workload.output_lens[:count]
    batch = args.hf_batch_size
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    index = 0
    while index < count:
        chunk = prompts[index : index + batch]
        lens = output_lens[index : index + batch]
        width = max(len(p) for p in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, prompt in enumerate(chunk):  # left padding
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        out_of_memory = False
        try:
            with torch.no_grad():
                model.generate(
                    ids.cuda(),
                    attention_mask=mask.cuda(),
                    max_new_tokens=max(lens),
                    min_new_tokens=max(lens),
                    do_sample=workload.temperature > 0,
                    temperature=workload.temperature or None,
                    top_p=None,
                    top_k=None,
                )
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            out_of_memory = True
        if out_of_memory:
            # Outside the handler: its traceback no longer holds the failed batch's tensors.
            batch //= 2
            logger.warning(
                "transformers ran out of memory; starting again with batches of %d", batch
            )
            gc.collect()
            torch.cuda.empty_cache()
            # The failed attempt does not count against transformers: time from scratch.
            index = 0
            torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            continue
        index += len(chunk)
    elapsed = time.perf_counter() - started
    result = {
        "elapsed_s": elapsed,
        "requests": count,
        "batch_size": batch,
        "prompt_tokens": sum(len(p) for p in prompts),
        "output_tokens": sum(output_lens),
        "peak_gpu_memory_gib": torch.cuda.max_memory_reserved() / 2**30,
    }
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--workload", default="W1", choices=["W1", "W2", "W4"])
    parser.add_argument(
        "--backend", default="metroline", choices=["metroline", "hf", "vllm", "both"]
    )
    parser.add_argument("--num-requests", type=int, default=None)
    parser.add_argument(
        "--gpu-timeline",
        action="store_true",
        help="profile the measured run's kernels: GPU busy and idle time, and where it idles",
    )
    parser.add_argument(
        "--profile-steps",
        type=parse_window,
        default=None,
        metavar="START:COUNT",
        help="host and device profile of the measured run's steps START..START+COUNT-1",
    )
    # The engine's own flags and defaults, but for the workload's dtype and length.
    add_flags(
        parser.add_argument_group("engine"),
        EngineArgs,
        skip=ENGINE_FLAGS_FIXED,
        defaults={"dtype": "bfloat16", "max_model_len": 4096},
    )
    parser.add_argument("--hf-max-requests", type=int, default=None)
    parser.add_argument("--hf-batch-size", type=int, default=128)
    parser.add_argument(
        "--vllm-arg", action="append", metavar="KEY=VALUE", help="a vllm.LLM argument (repeat)"
    )
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    if args.gpu_timeline and args.profile_steps:  # one profiler session at a time
        parser.error("--gpu-timeline and --profile-steps each profile the run: give one")
    if args.backend != "metroline" and (args.gpu_timeline or args.profile_steps):
        parser.error(
            "--gpu-timeline and --profile-steps profile Metroline only: --backend metroline"
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    env = environment()
    bandwidth, matmul = copy_bandwidth(), matmul_flops()
    fp8_weights = args.quantization == "fp8"
    kv_bytes_per_value = 1 if args.kv_cache_dtype != "auto" else 2
    fp8_matmul = fp8_matmul_flops() if fp8_weights else None
    workload = make_workload(args.workload, SHAPES[args.model]["vocab_size"], args.num_requests)
    record: dict[str, Any] = {
        "benchmark": "throughput",
        "environment": env,
        "parameters": vars(args) | {"out": str(args.out)},
        "ceilings": {"copy_bytes_per_s": bandwidth, "bf16_flops": matmul, "fp8_flops": fp8_matmul},
        "workload": {
            "name": workload.name,
            "requests": len(workload.prompts),
            "prompt_tokens": workload.num_prompt_tokens,
            "output_tokens": workload.num_output_tokens,
        },
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shape_dir = write_shape(args.model, Path(tmp) / args.model)
        backends = ["metroline", "hf"] if args.backend == "both" else [args.backend]
        for backend in backends:
            if backend == "hf":
                result = run_hf(shape_dir, workload, args)
                requests, prompt_tokens, output_tokens = (
                    result["requests"],
                    result["prompt_tokens"],
                    result["output_tokens"],
                )
            else:
                if backend == "metroline":
                    result = run_metroline(shape_dir, workload, args)
                else:
                    result = run_vllm(shape_dir, workload, SHAPES[args.model]["vocab_size"], args)
                requests, prompt_tokens, output_tokens = (
                    len(workload.prompts),
                    workload.num_prompt_tokens,
                    workload.num_output_tokens,
                )
            elapsed = result["elapsed_s"]
            result |= {
                "requests_per_s": requests / elapsed,
                "output_tokens_per_s": output_tokens / elapsed,
                "total_tokens_per_s": (prompt_tokens + output_tokens) / elapsed,
            }
            if backend != "hf" and workload.name == "W1":
                max_num_seqs = (
                    result["settings"]["max_num_seqs"] if backend == "vllm" else args.max_num_seqs
                )
                roof = w1_roofline_seconds(
                    args.model,
                    [len(p) for p in workload.prompts],
                    workload.output_lens,
                    result["kv_tokens"] * args.tensor_parallel_size,
                    max_num_seqs,
                    bandwidth * args.tensor_parallel_size,
                    (fp8_matmul or matmul) * args.tensor_parallel_size,
                    fp8_weights,
                    kv_bytes_per_value,
                )
                result["roofline"] = roof | {"fraction_achieved": roof["total_s"] / elapsed}
            if backend == "metroline" and workload.name == "W4":
                flops = prefill_flops(args.model, [len(p) for p in workload.prompts])
                result["matmul_fraction"] = flops / elapsed / (matmul * args.tensor_parallel_size)
            record[backend] = result
            rows.append((backend, result))
    if "vllm" in record:
        record["environment"]["vllm"] = record["vllm"]["version"]
    if "metroline" in record and "hf" in record:
        record["speedup_output_tokens_per_s"] = (
            record["metroline"]["output_tokens_per_s"] / record["hf"]["output_tokens_per_s"]
        )
    tp = args.tensor_parallel_size
    parts = [gpu_slug(env["gpu"]), args.workload, args.model, f"tp{tp}", args.backend]
    parts += ["fp8"] if fp8_weights else []
    parts += ["kvfp8"] if kv_bytes_per_value == 1 else []
    if "metroline" in record:
        parts.append("async" if record["metroline"]["async_scheduling"] else "sync")
        if record["metroline"]["mixed_step_graphs"]:
            parts.append("mixedgraphs")
    save_record(args.out, parts, record)

    print(
        f"\n{workload.name} on {args.model} (TP={args.tensor_parallel_size}), {env['gpu']}; copy "
        f"{bandwidth / 1e12:.2f} TB/s, bf16 {matmul / 1e12:.0f} TFLOP/s; weights "
        f"{weight_bytes(args.model, fp8_projections=fp8_weights) / 1e9:.1f} GB"
    )
    print(
        f"{'backend':10s} {'req/s':>8s} {'out tok/s':>10s} {'total tok/s':>12s} "
        f"{'wall s':>8s} {'peak GiB':>9s}"
    )
    for backend, r in rows:
        memory = r.get("peak_gpu_memory_gib", r.get("gpu_memory_in_use_gib", float("nan")))
        print(
            f"{backend:10s} {r['requests_per_s']:8.2f} {r['output_tokens_per_s']:10.0f} "
            f"{r['total_tokens_per_s']:12.0f} {r['elapsed_s']:8.1f} {memory:9.1f}"
        )
    for backend, r in rows:
        if "roofline" in r:
            roof = r["roofline"]
            print(
                f"{backend} W1 roofline: batch {roof['batch']}, prefill {roof['prefill_s']:.1f} s"
                f" + decode {roof['decode_s']:.1f} s = {roof['total_s']:.1f} s; achieved "
                f"{roof['fraction_achieved']:.0%}"
            )
    if "settings" in record.get("vllm", {}):
        print(f"vLLM {record['vllm']['version']} settings: {record['vllm']['settings']}")
    if "num_steps" in record.get("metroline", {}):
        m = record["metroline"]
        print(
            f"Metroline steps: {m['num_steps']} ({m['num_prefill_steps']} with a prompt chunk, "
            f"{m['num_decode_steps']} decode only), {m['mean_tokens_per_step']:.0f} tokens and "
            f"{m['mean_step_ms']:.1f} ms a step; asynchronous scheduling "
            f"{'on' if m['async_scheduling'] else 'off'}; mixed-step graphs "
            f"{'on' if m['mixed_step_graphs'] else 'off'}; kernels compiled after start-up: "
            f"{m['kernels_compiled_after_start']}"
        )
    for rank, phases in enumerate(record.get("metroline", {}).get("host_timings") or []):
        if phases:
            print(
                f"host time on rank {rank}: "
                + ", ".join(f"{name} {p['total_s']:.2f} s" for name, p in phases.items())
            )
    if "matmul_fraction" in record.get("metroline", {}):
        print(f"W4 prefill: {record['metroline']['matmul_fraction']:.0%} of the bf16 matmul rate")
    if "speedup_output_tokens_per_s" in record:
        print(
            "Metroline / transformers output throughput: "
            f"{record['speedup_output_tokens_per_s']:.1f}x"
        )


if __name__ == "__main__":
    main()
