"""Tensor parallelism at every TP size the machine has GPUs for (issue 8's correctness run).

``python -P tests/gpu/tp_scaling_check.py --tp-sizes 1,2,4 --shapes llama3-8b llama3-70b:8``

For each shape (``NAME`` or ``NAME:LAYERS``, the latter keeping the shape's widths with fewer
layers so that TP=1 fits one card as the reference; ``@2,4`` after either runs only those TP
sizes, e.g. ``llama3-70b@2,4`` at full depth, where TP=1 does not fit): first-step logits of
every TP size against the smallest (relative Frobenius error, bf16, same synthetic weights)
and greedy agreement over 64 tokens. Then the replicated-KV-head case: a tiny fp32 Llama with
2 KV heads at the largest TP size (each KV head on several ranks) must give transformers'
greedy tokens exactly. With ``--fp32-reference``, each shape also runs in fp32 at its largest
TP size: the bf16 runs' distance from it is the noise floor the TP comparison sits on (random
weights through many layers amplify bf16 rounding). Prints a table last and writes JSON to
$OUT (or the working directory).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests"), str(ROOT / "tests" / "gpu")]

from conftest import write_tiny_checkpoint  # noqa: E402
from engine_vs_transformers import hf_generate, prompts_of  # noqa: E402
from gpu_helpers import agreement, release, report  # noqa: E402
from shapes import write_shape  # noqa: E402
from tensor_parallel_check import greedy_run  # noqa: E402

from metroline.engine import LLM, SamplingParams  # noqa: E402


def check_shape(
    spec: str, tp_sizes: list[int], workdir: Path, results: dict, fp32_reference: bool
) -> None:
    spec, _, only = spec.partition("@")
    if only:
        tp_sizes = [tp for tp in map(int, only.split(",")) if tp in tp_sizes]
    name, _, layers = spec.partition(":")
    overrides = {"num_hidden_layers": int(layers)} if layers else {}
    path = write_shape(name, workdir / spec, **overrides)
    generator = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(100, 128000, (n,), generator=generator).tolist() for n in (17, 100, 500, 1000)
    ]
    runs = {}
    for tp in tp_sizes:
        try:
            runs[tp] = greedy_run(path, tp, prompts)
            results[f"{spec}/tp{tp}/init_s"] = round(runs[tp][2], 1)
        except Exception as error:  # e.g. the shape does not fit this many cards
            results[f"{spec}/tp{tp}/error"] = repr(error)[:300]
    if not runs:
        return
    base = min(runs)
    logits0, tokens0, _ = runs[base]
    for tp, (logits, tokens, _) in sorted(runs.items()):
        if tp == base:
            continue
        results[f"{spec}/tp{tp}_vs_tp{base}/first_step_logits_rel_error"] = float(
            (logits - logits0).norm() / logits0.norm()
        )
        results[f"{spec}/tp{tp}_vs_tp{base}/first_token_equal"] = (
            logits.argmax(-1) == logits0.argmax(-1)
        ).tolist()
        results[f"{spec}/tp{tp}_vs_tp{base}/greedy_64"] = agreement(tokens, tokens0)
    if fp32_reference:
        top = max(runs)
        try:
            ref_logits, ref_tokens, _ = greedy_run(path, top, prompts, dtype="float32")
        except Exception as error:
            results[f"{spec}/fp32_tp{top}/error"] = repr(error)[:300]
            return
        for tp, (logits, tokens, _) in sorted(runs.items()):
            key = f"{spec}/tp{tp}_bf16_vs_fp32_tp{top}"
            results[f"{key}/first_step_logits_rel_error"] = float(
                (logits.float() - ref_logits).norm() / ref_logits.norm()
            )
            results[f"{key}/greedy_64"] = agreement(tokens, ref_tokens)


def check_replicated_kv_heads(tp: int, workdir: Path, results: dict) -> None:
    """4 query heads, 2 KV heads at TP=``tp`` > 2: every rank holds a copy of one KV head."""
    from transformers import AutoModelForCausalLM

    path = write_tiny_checkpoint(
        workdir / "tiny-kv2",
        "llama",
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    prompts = prompts_of((1, 5, 16, 17, 31, 48, 65, 90), seed=0, vocab=512)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).cuda()
    expected = [hf_generate(hf, p, 32) for p in prompts]
    release(hf)
    llm = LLM(
        model=str(path),
        tensor_parallel_size=tp,
        kv_cache_memory_bytes=64 * 2**20,
        enable_prefix_caching=True,
        max_num_batched_tokens=40,
    )
    params = SamplingParams(temperature=0, max_tokens=32)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    results[f"tiny-kv2/tp{tp}/exact_vs_transformers"] = got == expected
    worker = llm.engine_core.executor.worker
    results[f"tiny-kv2/tp{tp}/kv_heads_per_rank"] = worker.kv_heads_per_rank
    release(llm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp-sizes", default="1,2,4")
    parser.add_argument("--shapes", nargs="*", default=["llama3-8b", "llama3-70b:8"])
    parser.add_argument("--fp32-reference", action="store_true")
    args = parser.parse_args()
    count = torch.cuda.device_count()
    tp_sizes = [tp for tp in map(int, args.tp_sizes.split(",")) if tp <= count]
    results: dict[str, object] = {"gpus": [torch.cuda.get_device_name(i) for i in range(count)]}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if max(tp_sizes) > 2:
            try:
                check_replicated_kv_heads(max(tp_sizes), workdir, results)
            except Exception as error:
                results["tiny-kv2/error"] = repr(error)[:300]
        for spec in args.shapes:
            check_shape(spec, tp_sizes, workdir, results, args.fp32_reference)
    report(results, "tp_scaling_check", "tensor parallel scaling")
    inexact = [k for k, v in results.items() if k.endswith("exact_vs_transformers") and not v]
    sys.exit(1 if inexact else 0)


if __name__ == "__main__":
    main()
