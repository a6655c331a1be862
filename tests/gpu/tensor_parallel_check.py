"""Tensor parallelism on GPUs: TP=2 against TP=1 on the llama3-8b shape in bf16 (same
synthetic weights), and KV capacity of a shape at TP=1 and TP=2.

``python -P tests/gpu/tensor_parallel_check.py [--capacity qwen2.5-32b]`` on a 2-GPU machine.
Prints a table last and writes JSON to $OUT (or the working directory).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests" / "gpu")]

from gpu_helpers import agreement, record_first_logits, release, report  # noqa: E402
from shapes import write_shape  # noqa: E402

from metroline.engine import LLM, SamplingParams  # noqa: E402


def greedy_run(
    path: Path, tp: int, prompts: list[list[int]], dtype: str = "bfloat16"
) -> tuple[torch.Tensor, list, float]:
    started = time.perf_counter()
    llm = LLM(
        model=str(path),
        load_format="dummy",
        dtype=dtype,
        tensor_parallel_size=tp,
        max_model_len=2048,
        kv_cache_memory_bytes=8 * 2**30,
        enable_prefix_caching=False,
    )
    init_s = time.perf_counter() - started
    recorder = record_first_logits(llm)
    # A non-greedy field keeps the sampler (and so the recorder) in the path; top_k=1 is greedy.
    params = SamplingParams(temperature=1.0, top_k=1, max_tokens=64, ignore_eos=True)
    tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    release(llm)
    return recorder.first, tokens, init_s


def capacity(path: Path, tp: int) -> dict[str, float]:
    started = time.perf_counter()
    llm = LLM(
        model=str(path),
        load_format="dummy",
        dtype="bfloat16",
        tensor_parallel_size=tp,
        max_model_len=4096,
        gpu_memory_utilization=0.9,
    )
    blocks = llm.engine_core.num_blocks
    result = {
        "kv_tokens": blocks * llm.config.cache.block_size,
        "init_s": round(time.perf_counter() - started, 1),
    }
    release(llm)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--capacity", nargs="*", default=["llama3-8b"])
    args = parser.parse_args()
    results: dict[str, object] = {
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    }
    generator = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(100, 128000, (n,), generator=generator).tolist() for n in (17, 100, 500, 1000)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_shape("llama3-8b", Path(tmp) / "llama3-8b")
        logits1, tokens1, init1 = greedy_run(path, 1, prompts)
        logits2, tokens2, init2 = greedy_run(path, 2, prompts)
        results["llama3-8b/init_s"] = {"tp1": round(init1, 1), "tp2": round(init2, 1)}
        results["llama3-8b/first_step_logits_rel_error_tp2_vs_tp1"] = float(
            (logits2 - logits1).norm() / logits1.norm()
        )
        results["llama3-8b/first_token_equal"] = (logits1.argmax(-1) == logits2.argmax(-1)).tolist()
        results["llama3-8b/greedy_64_tp2_vs_tp1"] = agreement(tokens2, tokens1)
        for shape in args.capacity:
            shape_path = write_shape(shape, Path(tmp) / shape)
            for tp in (1, 2):
                try:
                    results[f"{shape}/capacity_tp{tp}"] = capacity(shape_path, tp)
                except Exception as error:  # e.g. the weights alone exceed one card
                    results[f"{shape}/capacity_tp{tp}"] = {"error": repr(error)[:300]}
    report(results, "tensor_parallel_check", "tensor parallel")


if __name__ == "__main__":
    main()
