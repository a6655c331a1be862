"""W3 - decode roofline (benchmarks/README.md): batch B in {1, 8, 32, 128, 256}, context C in
{512, 2048}, timed over 128 decode steps of the whole engine (scheduler, model, sampler).

``python -P benchmarks/decode.py --model llama3-8b [--profile]``

A decode step must read the weights plus B*C*(KV bytes per token); the table gives time per
step (batch 1: time per output token), the bytes/s achieved and their fraction of the copy
bandwidth measured first. ``--profile`` records a torch-profiler breakdown of steady-state
steps (batch 64, context 512) by kernel family.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import copy_bandwidth, environment, gpu_slug, matmul_flops
from records import save_record
from roofline import kv_bytes_per_token
from shapes import SHAPES, weight_bytes, write_shape
from step_profile import profile_decode

from metroline.engine.config import EngineArgs
from metroline.engine.flags import add_flags, flag_values

DECODE_STEPS = 128
#: Room past the prompt: decode steps during others' prefill, plus the timed steps.
EXTRA_LEN = 1024
#: Engine settings the sweep decides itself.
ENGINE_FLAGS_FIXED = (
    "model",
    "load_format",
    "max_model_len",
    "max_num_seqs",
    "enable_prefix_caching",
)


def run_case(llm: Any, batch: int, context: int, steps: int) -> dict[str, Any]:
    """Prefill ``batch`` requests of ``context`` tokens, then time ``steps`` decode steps."""
    from metroline.engine import SamplingParams
    from metroline.engine.messages import EngineCoreRequest

    core = llm.engine_core
    vocab = llm.config.model.arch.vocab_size
    rng = random.Random(batch * 100_000 + context)
    # Requests that finish prefill early decode while the others prefill: no token limit
    # (up to max_model_len), they are aborted once the timed steps are done.
    params = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    ids = [f"w3-{batch}-{context}-{i}" for i in range(batch)]
    for request_id in ids:
        prompt = [rng.randrange(2, vocab) for _ in range(context)]
        core.add_request(EngineCoreRequest(request_id, prompt, params))
    while True:  # prefill until every request decodes
        core.step()
        if all(r.num_output_tokens >= 1 for r in core.scheduler.requests.values()):
            break
    # A step returns once its tokens are read back (with asynchronous scheduling, those of
    # the step before, the next one already running): the time between two returns is one
    # steady-state step, the host's planning included. No synchronisation in between, which
    # would hide the overlap that asynchronous scheduling buys.
    torch.cuda.synchronize()
    times = []
    last = time.perf_counter()
    for _ in range(steps):
        outputs = core.step()
        now = time.perf_counter()
        times.append(now - last)
        last = now
        if len(outputs) != batch:
            raise RuntimeError(f"a decode step served {len(outputs)} of {batch} requests")
    times = times[1:]  # the first interval starts from an idle device
    core.finish_requests(ids)
    core.step()
    return {
        "step_s_median": statistics.median(times),
        "step_s_mean": statistics.mean(times),
        "preemptions": core.stats().num_preemptions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--batches", default="1,8,32,128,256")
    parser.add_argument("--contexts", default="512,2048")
    # The engine's own flags, but for what the sweep decides (lengths, batch, no caching).
    add_flags(
        parser.add_argument_group("engine"),
        EngineArgs,
        skip=ENGINE_FLAGS_FIXED,
        defaults={"dtype": "bfloat16"},
    )
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from metroline.engine import LLM

    env = environment()
    bandwidth, matmul = copy_bandwidth(), matmul_flops()
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_shape(args.model, Path(tmp) / args.model)
        started = time.perf_counter()
        llm = LLM(
            model=str(path),
            load_format="dummy",
            max_model_len=max(contexts) + EXTRA_LEN,
            max_num_seqs=max(batches),
            enable_prefix_caching=False,
            **flag_values(args, EngineArgs, skip=ENGINE_FLAGS_FIXED),
        )
        init_s = time.perf_counter() - started
        asynchronous = llm.engine_core.async_scheduling
        rows = []
        fp8_weights = args.quantization == "fp8"
        kv_bytes = 1 if args.kv_cache_dtype != "auto" else 2
        weights = weight_bytes(args.model, fp8_projections=fp8_weights) / args.tensor_parallel_size
        per_token = kv_bytes_per_token(args.model, kv_bytes) / args.tensor_parallel_size
        kv_tokens = llm.engine_core.num_blocks * llm.config.cache.block_size
        budget = llm.config.scheduler.max_num_batched_tokens
        for context in contexts:
            for batch in batches:
                prefill_steps = -(-batch * context // max(1, budget - batch)) + 1
                needed = batch * (context + prefill_steps + DECODE_STEPS)
                if needed > kv_tokens:
                    rows.append(
                        {
                            "batch": batch,
                            "context": context,
                            "skipped": f"needs {needed} KV tokens, pool holds {kv_tokens}",
                        }
                    )
                    print(f"skip B={batch} C={context}: {rows[-1]['skipped']}", flush=True)
                    continue
                result = run_case(llm, batch, context, DECODE_STEPS)
                mean_context = context + DECODE_STEPS / 2
                step_bytes = weights + batch * mean_context * per_token
                step = result["step_s_median"]
                result |= {
                    "batch": batch,
                    "context": context,
                    "bytes_per_step": step_bytes,
                    "bytes_per_s": step_bytes / step,
                    "bandwidth_fraction": step_bytes / step / bandwidth,
                    "weight_floor_s": weights / bandwidth,
                    "tokens_per_s": batch / step,
                }
                rows.append(result)
                print(
                    f"B={batch} C={context}: {step * 1e3:.2f} ms/step, "
                    f"{result['bandwidth_fraction']:.0%} of copy bandwidth",
                    flush=True,
                )
        profile = profile_decode(llm, args.out, 64, 512) if args.profile else None
        llm.shutdown()
    record = {
        "benchmark": "decode-W3",
        "environment": env,
        "parameters": vars(args) | {"out": str(args.out)},
        "ceilings": {"copy_bytes_per_s": bandwidth, "bf16_flops": matmul},
        "init_s": init_s,
        "async_scheduling": asynchronous,
        "rows": rows,
        "profile": profile,
    }
    save_record(
        args.out,
        [
            gpu_slug(env["gpu"]),
            "W3",
            args.model,
            f"tp{args.tensor_parallel_size}",
            "eager" if args.enforce_eager else "graphs",
            "async" if asynchronous else "sync",
            *(["fp8"] if args.quantization == "fp8" else []),
            *(["kvfp8"] if args.kv_cache_dtype != "auto" else []),
        ],
        record,
    )
    print(
        f"\nW3 decode on {args.model} (TP={args.tensor_parallel_size}, "
        f"{'eager' if args.enforce_eager else 'CUDA graphs'}, "
        f"{'asynchronous' if asynchronous else 'synchronous'} scheduling, weights "
        f"{args.quantization or 'bf16'}, KV {args.kv_cache_dtype}), {env['gpu']}; copy "
        f"{bandwidth / 1e12:.2f} TB/s; weight-read floor {weights / bandwidth * 1e3:.2f} ms; "
        f"engine start {init_s:.1f} s"
    )
    print(
        f"{'B':>4s} {'C':>5s} {'step ms':>8s} {'x floor':>8s} {'tok/s':>8s} "
        f"{'TB/s':>6s} {'of copy':>8s}"
    )
    for r in rows:
        if "skipped" in r:
            print(f"{r['batch']:4d} {r['context']:5d}  skipped: {r['skipped']}")
            continue
        print(
            f"{r['batch']:4d} {r['context']:5d} {r['step_s_median'] * 1e3:8.2f} "
            f"{r['step_s_median'] / r['weight_floor_s']:8.2f} {r['tokens_per_s']:8.0f} "
            f"{r['bytes_per_s'] / 1e12:6.2f} {r['bandwidth_fraction']:8.0%}"
        )
    if profile:
        print(
            "profile (ms per step, batch 64, context 512): "
            + ", ".join(f"{k} {v:.2f}" for k, v in profile.items() if isinstance(v, float))
        )


if __name__ == "__main__":
    main()
