"""Where a step's time goes: torch-profiler kernel families of whole engine steps.

``python -P benchmarks/step_profile.py --model llama3-8b --max-num-seqs 1024
--max-num-batched-tokens 16384``

Profiles the step mixes W1 is made of: a prefill-only step filling the token budget (prompts
of 1024 tokens), and steady decode steps at several batches (context 512). Each row gives
the wall time of a step, the GPU time by kernel family (GEMM, attention, norm, rotary, KV
write, activation, sampling and the rest) and the GEMMs' achieved FLOP rate against the
measured bf16 matmul rate, so a gap can be put on a kernel family. ``decode.py --profile``
uses :func:`profile_decode` for its batch-64 breakdown.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, gpu_slug, matmul_flops
from records import save_record
from shapes import SHAPES, weight_bytes, write_shape

from metroline.engine.config import EngineArgs
from metroline.engine.flags import add_flags, flag_values

#: Kernel name fragments of each family (first match wins, in this order).
FAMILIES = {
    "attention": ("paged_attention", "merge"),
    "fp8_quant": ("_quant_kernel", "_quant_row_kernel"),
    "gemm": ("gemm", "nvjet", "cutlass", "sm90", "xmma"),
    "norm": ("rms_norm",),
    "rotary": ("rotary",),  # RoPE, with the KV write in one launch since session 15
    "kv_write": ("kv_cache", "write_kv"),
    "activation": ("silu",),
    "sampling": ("argmax", "softmax", "topk", "sort", "multinomial", "gather"),
    "nccl": ("nccl",),
}
ENGINE_FLAGS_FIXED = ("model", "load_format", "max_model_len", "enable_prefix_caching")


def kernel_families(prof: Any, steps: int) -> dict[str, float]:
    """GPU milliseconds per step by family, from a finished ``torch.profiler.profile``."""
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
        if not device_us or event.key.startswith("cuda") or event.key.startswith("aten::"):
            continue
        family = next(
            (f for f, keys in FAMILIES.items() if any(k in event.key for k in keys)), "other"
        )
        totals[family] = totals.get(family, 0.0) + device_us / 1e3 / steps
    return totals


def profiled_steps(core: Any, steps: int, out: Path, name: str) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            core.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - started) / steps
    (out / f"{name}-profile-table.txt").write_text(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    )
    families = kernel_families(prof, steps)
    return {"wall_ms_per_step": wall * 1e3, "gpu_ms_per_step": sum(families.values())} | families


def add_requests(
    core: Any, ids: list[str], length: int, max_tokens: int | None, vocab: int, seed: int
) -> None:
    from metroline.engine import SamplingParams
    from metroline.engine.messages import EngineCoreRequest

    rng = random.Random(seed)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for request_id in ids:
        prompt = [rng.randrange(2, vocab) for _ in range(length)]
        core.add_request(EngineCoreRequest(request_id, prompt, params))


def profile_decode(llm: Any, out: Path, batch: int, context: int, steps: int = 10) -> dict:
    """Steady decode steps at ``batch`` requests of ``context`` tokens."""
    core = llm.engine_core
    ids = [f"prof-d{batch}-{i}" for i in range(batch)]
    add_requests(core, ids, context, None, llm.config.model.arch.vocab_size, batch)
    while not all(r.num_output_tokens >= 1 for r in core.scheduler.requests.values()):
        core.step()
    for _ in range(3):
        core.step()
    row = profiled_steps(core, steps, out, f"decode-b{batch}-c{context}")
    core.finish_requests(ids)
    core.step()
    return row | {"kind": "decode", "batch": batch, "context": context, "tokens": batch}


def profile_prefill(llm: Any, out: Path, length: int = 1024, repeats: int = 3) -> dict:
    """Steps that are one full token budget of fresh prompts of ``length`` tokens each."""
    core = llm.engine_core
    budget = llm.config.scheduler.max_num_batched_tokens
    count = max(1, budget // length)
    rows = []
    for repeat in range(repeats + 1):  # the first is a warm-up
        ids = [f"prof-p{repeat}-{i}" for i in range(count)]
        add_requests(core, ids, length, 1, llm.config.model.arch.vocab_size, 7 + repeat)
        row = profiled_steps(core, 1, out, "prefill")
        while core.scheduler.requests:
            core.step()
        if repeat:
            rows.append(row)
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    return mean | {"kind": "prefill", "batch": count, "context": length, "tokens": count * length}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--batches", default="256,1024")
    parser.add_argument("--context", type=int, default=512)
    add_flags(
        parser.add_argument_group("engine"), EngineArgs, skip=ENGINE_FLAGS_FIXED,
        defaults={"dtype": "bfloat16"},
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from metroline.engine import LLM

    env, matmul = environment(), matmul_flops()
    args.out.mkdir(parents=True, exist_ok=True)
    params = weight_bytes(args.model) / 2 / args.tensor_parallel_size
    with tempfile.TemporaryDirectory() as tmp:
        path = write_shape(args.model, Path(tmp) / args.model)
        llm = LLM(
            model=str(path), load_format="dummy", max_model_len=4096,
            enable_prefix_caching=False, **flag_values(args, EngineArgs, skip=ENGINE_FLAGS_FIXED),
        )  # fmt: skip
        rows = [profile_prefill(llm, args.out)]
        rows += [
            profile_decode(llm, args.out, int(b), args.context) for b in args.batches.split(",")
        ]
        llm.shutdown()
    for row in rows:
        gemm_s = row.get("gemm", 0.0) / 1e3
        row["gemm_fraction_of_matmul_rate"] = (
            2 * params * row["tokens"] / gemm_s / matmul if gemm_s else None
        )
    record = {"benchmark": "step-profile", "environment": env, "bf16_flops": matmul, "rows": rows}
    record["parameters"] = vars(args) | {"out": str(args.out)}
    save_record(args.out, [gpu_slug(env["gpu"]), "steps", args.model], record)
    names = ["wall_ms_per_step", "gpu_ms_per_step", *FAMILIES, "other"]
    print(f"\nstep profile, {args.model}, {env['gpu']} (ms per step)")
    print(
        f"{'step':>16s} "
        + " ".join(f"{n.replace('_ms_per_step', ''):>9s}" for n in names)
        + "  gemm/peak"
    )
    for r in rows:
        label = f"{r['kind']} {r['batch']}x{r['context']}"
        cells = " ".join(f"{r.get(n, 0.0):9.2f}" for n in names)
        frac = r["gemm_fraction_of_matmul_rate"]
        print(f"{label:>16s} {cells}  {frac:.0%}" if frac else f"{label:>16s} {cells}")


if __name__ == "__main__":
    main()
