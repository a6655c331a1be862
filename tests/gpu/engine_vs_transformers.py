"""GPU end-to-end check of the engine on its Triton kernels against Hugging Face transformers.

Run on a CUDA machine from the repository root: ``python -P tests/gpu/engine_vs_transformers.py``.
1. Tiny random fp32 checkpoints of the four architectures (head dim 64): greedy tokens must
   equal transformers exactly - plain, with prefix caching, chunked prefill and preemption.
2. The llama3-8b shape in bf16 with synthetic weights shared by both sides: relative error of
   the first-step logits and greedy agreement over 64 tokens.
3. KV-pool sizing by profiling at gpu_memory_utilization 0.9.
Prints a table last and writes JSON to $OUT (or the working directory).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "gpu"), str(ROOT / "benchmarks")]

from conftest import write_tiny_checkpoint  # noqa: E402
from gpu_helpers import agreement, record_first_logits, release, report  # noqa: E402
from shapes import write_shape  # noqa: E402

from metroline.engine import LLM, SamplingParams  # noqa: E402
from metroline.engine.models.loader import synthetic_checkpoint  # noqa: E402

RESULTS: dict[str, object] = {}
TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


def prompts_of(lengths, seed, vocab):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=generator).tolist() for n in lengths]


def hf_generate(model, prompt, max_new_tokens):
    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return out[0, len(prompt) :].tolist()


def check_tiny(workdir: Path) -> None:
    from transformers import AutoModelForCausalLM

    prompts = prompts_of((1, 5, 16, 17, 31, 48, 65, 90), seed=0, vocab=512)
    greedy = SamplingParams(temperature=0, max_tokens=32)
    for arch in ("llama", "mistral", "qwen2", "qwen3"):
        extra = dict(TINY, head_dim=64) if arch == "qwen3" else TINY
        path = write_tiny_checkpoint(workdir / arch, arch, **extra)
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).cuda()
        expected = [hf_generate(hf, p, 32) for p in prompts]
        release(hf)
        variants = {
            "plain": dict(enable_prefix_caching=False, async_scheduling=False),
            "prefix": dict(enable_prefix_caching=True, async_scheduling=False),
            "chunked": dict(max_num_batched_tokens=7, async_scheduling=False),
            "preempt": dict(max_model_len=128, num_blocks=12, async_scheduling=False),
            # One step in flight: planned while the previous step still runs on the GPU.
            "async": dict(async_scheduling=True, enable_prefix_caching=True),
            "async-chunked-preempt": dict(
                async_scheduling=True, max_model_len=128, num_blocks=12, max_num_batched_tokens=7
            ),
            # CUDA graphs also for steps with prompt chunks (the default at TP >= 2 only).
            "mixed-graphs": dict(mixed_step_graphs=True, enable_prefix_caching=True),
            "mixed-graphs-chunked-preempt": dict(
                mixed_step_graphs=True, max_model_len=128, num_blocks=12, max_num_batched_tokens=40
            ),
        }
        for name, kwargs in variants.items():
            blocks = kwargs.pop("num_blocks", None)
            per_block = 2 * 2 * 16 * 2 * 64 * 4  # layers * block * kv heads * dim * fp32
            memory = blocks * per_block if blocks else 64 * 2**20
            llm = LLM(model=str(path), device="cuda", kv_cache_memory_bytes=memory, **kwargs)
            runs = 2 if name in ("prefix", "async", "mixed-graphs") else 1
            ok = True
            for _ in range(runs):
                got = [
                    o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)
                ]
                ok = ok and got == expected
            stats = llm.engine_core.stats()
            graphs = llm.engine_core.executor.worker.model_runner.step_graphs
            if kwargs.get("mixed_step_graphs"):  # the variant must have used them
                ok = ok and graphs is not None and graphs.replays["mixed"] > 0
            RESULTS[f"tiny/{arch}/{name}"] = {
                "graph_steps": dict(graphs.replays) if graphs else {},
                "exact": ok,
                "preemptions": stats.num_preemptions,
                "prefix_hits": stats.prefix_cache_hits,
                "async_scheduling": llm.engine_core.async_scheduling,
            }
            release(llm)


def check_llama3_8b(workdir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    path = write_shape("llama3-8b", workdir / "llama3-8b")
    prompts = prompts_of((17, 100, 500, 1000), seed=1, vocab=128000)
    started = time.perf_counter()
    llm = LLM(
        model=str(path),
        load_format="dummy",
        dtype="bfloat16",
        max_model_len=2048,
        kv_cache_memory_bytes=8 * 2**30,
        enable_prefix_caching=False,
    )
    RESULTS["llama3-8b/engine_init_s"] = round(time.perf_counter() - started, 1)
    recorder = record_first_logits(llm)
    # top_k=1 is greedy but keeps the full sampler (and so the recorder) in the path.
    params = SamplingParams(temperature=1.0, top_k=1, max_tokens=64, ignore_eos=True)
    engine_tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    engine_logits = recorder.first.cuda()
    arch = llm.config.model.arch
    release(llm)

    config = AutoConfig.from_pretrained(str(path))
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = hf.state_dict()
    for name, tensor in synthetic_checkpoint(arch, seed=0, device=torch.device("cuda")):
        state[name].copy_(tensor)
    hf.generation_config.eos_token_id = None
    hf.eval()
    hf_logits = []
    for prompt in prompts:
        with torch.no_grad():
            hf_logits.append(hf(torch.tensor([prompt], device="cuda")).logits[0, -1].float())
    hf_logits = torch.stack(hf_logits)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    RESULTS["llama3-8b/first_step_rel_error_engine_vs_hf_bf16"] = rel(engine_logits, hf_logits)
    RESULTS["llama3-8b/first_token_equal"] = [
        int(a) == int(b) for a, b in zip(engine_logits.argmax(-1), hf_logits.argmax(-1))
    ]
    hf_bf16_tokens = [hf_generate(hf, prompt, 64) for prompt in prompts]
    # The noise floor of bf16 itself: both bf16 runs against the same weights in fp32.
    hf.float()
    with torch.no_grad():
        fp32_logits = torch.stack(
            [hf(torch.tensor([p], device="cuda")).logits[0, -1].float() for p in prompts]
        )
    RESULTS["llama3-8b/first_step_rel_error_engine_bf16_vs_fp32"] = rel(engine_logits, fp32_logits)
    RESULTS["llama3-8b/first_step_rel_error_hf_bf16_vs_fp32"] = rel(hf_logits, fp32_logits)
    hf_fp32_tokens = [hf_generate(hf, prompt, 64) for prompt in prompts]

    RESULTS["llama3-8b/greedy_64_engine_vs_hf_bf16"] = agreement(engine_tokens, hf_bf16_tokens)
    RESULTS["llama3-8b/greedy_64_engine_vs_hf_fp32"] = agreement(engine_tokens, hf_fp32_tokens)
    RESULTS["llama3-8b/greedy_64_hf_bf16_vs_hf_fp32"] = agreement(hf_bf16_tokens, hf_fp32_tokens)
    release(hf)


def check_profiling(workdir: Path) -> None:
    path = workdir / "llama3-8b"
    started = time.perf_counter()
    llm = LLM(model=str(path), load_format="dummy", dtype="bfloat16", gpu_memory_utilization=0.9)
    free_bytes, total = torch.cuda.mem_get_info()
    core = llm.engine_core
    RESULTS["profile/num_blocks"] = core.num_blocks
    RESULTS["profile/kv_tokens"] = core.num_blocks * llm.config.cache.block_size
    RESULTS["profile/used_fraction_after_init"] = round(1 - free_bytes / total, 3)
    RESULTS["profile/init_s"] = round(time.perf_counter() - started, 1)
    prompts = prompts_of([512] * 256, seed=2, vocab=128000)
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    llm.generate(prompts[:8], params, use_tqdm=False)
    torch.cuda.synchronize()
    started = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    RESULTS["smoke/output_tok_per_s_256x(512+128)"] = round(256 * 128 / elapsed)
    RESULTS["profile/peak_used_fraction"] = round(torch.cuda.max_memory_reserved() / total, 3)
    release(llm)


STEPS = {"tiny": check_tiny, "llama3-8b": check_llama3_8b, "profiling": check_profiling}


def main(names: list[str] | None = None) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    RESULTS["gpu"] = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for step in (STEPS[name] for name in names or STEPS):
            started = time.perf_counter()
            try:
                step(workdir)
            except Exception as error:  # report and go on: one broken part must not hide others
                import traceback

                traceback.print_exc()
                RESULTS[f"{step.__name__}/error"] = repr(error)[:500]
            RESULTS[f"{step.__name__}/seconds"] = round(time.perf_counter() - started, 1)
    report(RESULTS, "engine_vs_transformers", "engine vs transformers")
    failed = [k for k, v in RESULTS.items() if isinstance(v, dict) and v.get("exact") is False]
    failed += [k for k in RESULTS if k.endswith("/error")]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("steps", nargs="*", help=f"some of {', '.join(STEPS)} (default: all)")
    steps = parser.parse_args().steps
    if unknown := set(steps) - set(STEPS):
        parser.error(f"unknown steps {sorted(unknown)}; known: {', '.join(STEPS)}")
    main(steps)
