"""GPU check of fp8 (issue 18): kernels at real sizes, the llama3-8b shape with fp8 weights and
an fp8 KV cache, KV capacity, and the demo model's perplexity.

Run on an H100/H200 from the repository root: ``python -P tests/gpu/fp8_check.py [SECTION...]``
(sections: kernels, llama, demo; default all, about two minutes). ``--cpu-smoke`` runs every
section shrunk on the CPU, the kernels replaced by their references, so a broken script fails
before it costs GPU time.

1. kernels (``fp8_kernels_check.py``): quantizers and the fp8 KV write byte-exact against
   their references, paged attention over an fp8 cache and ``ops.fp8_linear`` within bounds.
2. llama3-8b shape, dummy bf16 weights (seed 0): fp8 weights, and fp8 weights + fp8 KV,
   against bf16: relative error of the first step's logits and greedy agreement over 64
   tokens (measured, not bounded: the weights are random).
3. KV capacity at gpu_memory_utilization 0.9 of those three engines: tokens and ratios; fp8 KV
   on the same fp8 weights must hold at least ``KV_RATIO_MIN`` times the tokens of bf16 KV.
4. The demo model (fp32): perplexity on its held-out text (as ``engine/demo/train.py`` scores
   it: windows of its ``--seq-len``, each token once) from transformers, from the engine in
   fp32 (within ``DEMO_ENGINE_BOUND`` of transformers) and with fp8 weights + fp8 KV (at most
   ``DEMO_PPL_RATIO_MAX`` times the fp32 engine's). Five engines in all, to bound the time.

Prints a summary table last and writes it with every check to ``$OUT/fp8_check.json``; exits
1 if a check failed or a section raised.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests" / "gpu"), str(ROOT / "benchmarks")]

from fp8_kernels_check import (  # noqa: E402
    SMOKE_KERNELS,
    KernelSizes,
    check_fp8_kernels,
    counting_scaled_mm,
)
from gpu_helpers import Verdicts, agreement, record_first_logits, release, report  # noqa: E402
from shapes import write_shape  # noqa: E402

from metroline.engine import LLM, SamplingParams  # noqa: E402
from metroline.engine.demo import demo_model_path  # noqa: E402
from metroline.engine.demo.corpus import is_heldout, stdlib_documents, strip_to_code  # noqa: E402
from metroline.engine.demo.evaluation import evaluate  # noqa: E402
from metroline.engine.demo.tokenization import encode_stream  # noqa: E402
from metroline.engine.demo.train import parse_args as demo_train_args  # noqa: E402

KV_RATIO_MIN = 1.9  # fp8 KV halves a block's bytes; the profiled rest is the same
DEMO_ENGINE_BOUND = 1e-3  # relative difference of the fp32 engine's perplexity from HF's
DEMO_PPL_RATIO_MAX = 1.05  # fp8 perplexity / fp32 perplexity
LLAMA_VARIANTS = {
    "bf16": {},
    "fp8": {"quantization": "fp8"},
    "fp8+kv8": {"quantization": "fp8", "kv_cache_dtype": "fp8"},
}
DEMO_VARIANTS = {"fp32": {}, "fp8+kv8": LLAMA_VARIANTS["fp8+kv8"]}


@dataclass(frozen=True)
class Plan:
    """Sizes of one run: the real ones (GPU) or the shrunk CPU smoke test (``SMOKE``)."""

    device: str = "cuda"
    kernels: KernelSizes = field(default_factory=KernelSizes)
    llama_overrides: dict[str, Any] = field(default_factory=dict)
    prompt_lens: tuple[int, ...] = (17, 100, 250, 500, 1000, 2000)  # one step: < 8192 tokens
    max_tokens: int = 64
    demo_windows: int | None = None  # None: the whole held-out stream
    demo_kv_bytes: int | None = 2**30  # None: the CPU default


SMOKE = Plan(
    device="cpu",
    kernels=SMOKE_KERNELS,
    llama_overrides=dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=1024,
        max_position_embeddings=512,
    ),
    prompt_lens=(5, 17, 40),
    max_tokens=8,
    demo_windows=2,
    demo_kv_bytes=None,
)


def run_llama(v: Verdicts, plan: Plan, workdir: Path) -> dict[str, dict[str, Any]]:
    """The three llama3-8b engines, one at a time: tokens, first logits, KV tokens."""
    path = write_shape("llama3-8b", workdir / "llama3-8b", **plan.llama_overrides)
    vocab = min(plan.llama_overrides.get("vocab_size", 128000), 128000)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in plan.prompt_lens]
    # top_k=1 is greedy but keeps the full sampler (and so the recorder) in the path.
    params = SamplingParams(temperature=1.0, top_k=1, max_tokens=plan.max_tokens, ignore_eos=True)
    runs: dict[str, dict[str, Any]] = {}
    for name, extra in LLAMA_VARIANTS.items():
        llm = None
        try:
            free = torch.cuda.mem_get_info()[0] / 2**30 if plan.device == "cuda" else math.nan
            started = time.perf_counter()
            with counting_scaled_mm() as calls:
                llm = LLM(
                    model=str(path),
                    device=plan.device,
                    load_format="dummy",
                    dtype="bfloat16",
                    seed=0,
                    gpu_memory_utilization=0.9,
                    enable_prefix_caching=False,
                    **extra,
                )
                init_s = time.perf_counter() - started
                recorder = record_first_logits(llm)
                outputs = llm.generate(prompts, params, use_tqdm=False)
            facts = {
                "kv_tokens": llm.engine_core.num_blocks * llm.config.cache.block_size,
                "kv_dtype": str(llm.engine_core.executor.worker.key_caches[0].dtype)[6:],
                "init_s": round(init_s, 1),
                "free_gib_before": round(free, 1),
                "scaled_mm_calls": calls[0],
            }
            rows = recorder.first.shape[0]
            v.check(f"llama3-8b engine {name}", rows == len(prompts), first_step_rows=rows, **facts)
            tokens = [o.outputs[0].token_ids for o in outputs]
            runs[name] = {"tokens": tokens, "logits": recorder.first, **facts}
        except Exception as error:
            v.failure(f"2 llama3-8b engine {name}", error)
        finally:
            release(llm)
    return runs


def compare_llama(v: Verdicts, plan: Plan, runs: dict[str, dict[str, Any]]) -> None:
    calls = {name: run["scaled_mm_calls"] for name, run in runs.items()}
    v.table["2 llama3-8b torch._scaled_mm calls (eager, incl. warm-up)"] = calls
    pairs = [("fp8", "bf16"), ("fp8+kv8", "bf16"), ("fp8+kv8", "fp8")]
    for name, base in ((a, b) for a, b in pairs if a in runs and b in runs):
        ours, theirs = runs[name]["logits"], runs[base]["logits"]
        err = float((ours - theirs).norm() / theirs.norm())
        firsts = (ours.argmax(-1) == theirs.argmax(-1)).tolist()
        rows = agreement(runs[name]["tokens"], runs[base]["tokens"])
        v.check(
            f"llama3-8b {name} vs {base}",
            math.isfinite(err),
            first_step_rel_err=err,
            first_token_equal=firsts,
            greedy=rows,
        )
        v.table[f"2 llama3-8b {name} vs {base}: first-step logits rel err"] = f"{err:.3e}"
        v.table[f"2 llama3-8b {name} vs {base}: greedy {plan.max_tokens} before divergence"] = [
            r["before_divergence"] for r in rows
        ]


def kv_capacity(v: Verdicts, runs: dict[str, dict[str, Any]]) -> None:
    tokens = {name: run["kv_tokens"] for name, run in runs.items()}
    for name, count in tokens.items():
        v.table[f"3 kv tokens @0.9: engine {name} ({runs[name]['kv_dtype']} KV)"] = count
    ratio_kv = tokens["fp8+kv8"] / tokens["fp8"]
    ratio_weights = tokens["fp8"] / tokens["bf16"]
    ratio_all = tokens["fp8+kv8"] / tokens["bf16"]
    v.table["3 kv tokens ratio: fp8 KV / bf16 KV (fp8 weights)"] = round(ratio_kv, 3)
    v.table["3 kv tokens ratio: fp8 weights / bf16 weights (bf16 KV)"] = round(ratio_weights, 3)
    v.table["3 kv tokens ratio: fp8 weights+KV / bf16 weights+KV"] = round(ratio_all, 3)
    v.check("kv capacity", ratio_kv >= KV_RATIO_MIN, tokens=tokens, ratio_kv=ratio_kv)


def check_llama(v: Verdicts, plan: Plan, workdir: Path) -> None:
    runs = v.section("2 llama3-8b engines", run_llama, v, plan, workdir) or {}
    v.section("2 llama3-8b comparison", compare_llama, v, plan, runs)
    v.section("3 kv capacity", kv_capacity, v, runs)


def held_out_stream(tokenizer: Any, per_mille: int, exclude: list[str]) -> torch.Tensor:
    """The demo's held-out token stream as train.py builds it (files chosen by path alone,
    normalised by ``strip_to_code``, each followed by EOS); only those files are parsed."""
    texts = []
    root = Path(sysconfig.get_paths()["stdlib"])
    for doc in stdlib_documents(root, exclude, code_only=False):
        if is_heldout(doc, per_mille):
            with contextlib.suppress(SyntaxError, ValueError, RecursionError):
                texts.append(strip_to_code(doc.text))
    return encode_stream(tokenizer, texts)


def engine_nats(llm: LLM, windows: list[list[int]]) -> float:
    """Mean negative log-likelihood (nats/token) of every window token after the first."""
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    total, count = 0.0, 0
    for output in llm.generate(windows, params, use_tqdm=False):
        for token, entry in zip(output.prompt_token_ids[1:], output.prompt_logprobs[1:]):
            total -= entry[token].logprob
            count += 1
    return total / count


def demo_perplexities(v: Verdicts, plan: Plan, workdir: Path) -> tuple[dict, dict, str]:
    """Perplexities of transformers (fp32) and of each engine variant, the fp8_linear path
    each took, and a label saying what text was scored."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = demo_model_path()
    train = demo_train_args(["--out", str(workdir / "unused")])
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    stream = held_out_stream(tokenizer, train.heldout_per_mille, train.exclude_dir)
    seq_len = train.seq_len
    n = (stream.numel() - 1) // seq_len
    n = min(n, plan.demo_windows or n)
    windows = [stream[i * seq_len : i * seq_len + seq_len + 1].tolist() for i in range(n)]
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(plan.device)
    nats = evaluate(hf, stream.to(plan.device), seq_len, 32, max_windows=n)
    ppl, paths = {"hf fp32": math.exp(nats)}, {}
    del hf
    release()
    for name, extra in DEMO_VARIANTS.items():
        llm = None
        try:
            with counting_scaled_mm() as calls:
                llm = LLM(
                    model=str(path),
                    device=plan.device,
                    enable_prefix_caching=False,
                    kv_cache_memory_bytes=plan.demo_kv_bytes,
                    **extra,
                )
                ppl[name] = math.exp(engine_nats(llm, windows))
            if extra:  # an fp8 engine: which matmul its projections took
                paths[name] = f"scaled_mm ({calls[0]} eager calls)" if calls[0] else "emulated"
        except Exception as error:
            v.failure(f"4 demo engine {name}", error)
        finally:
            release(llm)
    label = f"{n} windows x {seq_len} tokens of {stream.numel()}, python {sys.version.split()[0]}"
    return ppl, paths, label


def check_demo(v: Verdicts, plan: Plan, workdir: Path) -> None:
    ppl, paths, label = demo_perplexities(v, plan, workdir)
    v.table[f"4 demo ppl ({label})"] = {key: round(value, 4) for key, value in ppl.items()}
    v.table["4 demo fp8_linear path"] = paths
    v.check("demo engines ran", len(ppl) == 1 + len(DEMO_VARIANTS), ppl=ppl, paths=paths)
    if "fp32" in ppl:
        engine_err = abs(ppl["fp32"] - ppl["hf fp32"]) / ppl["hf fp32"]
        v.check("demo engine fp32 vs transformers", engine_err < DEMO_ENGINE_BOUND, rel=engine_err)
        for name in (k for k in ppl if k.startswith("fp8")):
            ratio = ppl[name] / ppl["fp32"]
            v.table[f"4 demo ppl ratio {name} / fp32"] = round(ratio, 4)
            v.check(f"demo {name} ppl ratio", ratio <= DEMO_PPL_RATIO_MAX, ratio=ratio)


SECTIONS = {
    "kernels": lambda v, plan, workdir: check_fp8_kernels(v, plan.kernels),
    "llama": check_llama,
    "demo": check_demo,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", help=f"some of {', '.join(SECTIONS)} (default all)")
    parser.add_argument("--cpu-smoke", action="store_true", help="everything shrunk, on the CPU")
    args = parser.parse_args()
    if unknown := set(args.sections) - set(SECTIONS):
        parser.error(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    if not args.cpu_smoke and not torch.cuda.is_available():
        parser.error("no CUDA device here; --cpu-smoke runs the shrunk CPU version")
    plan = SMOKE if args.cpu_smoke else Plan()
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references stay fp32
    gpu = "CPU smoke test" if args.cpu_smoke else torch.cuda.get_device_name(0)
    v = Verdicts()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sections or SECTIONS:
            v.section(name, SECTIONS[name], v, plan, Path(tmp))
    v.table["total seconds"] = round(time.perf_counter() - started, 1)
    v.table["failed"] = v.failed or "none"
    results = {"gpu": gpu, "table": v.table, "checks": v.details, "failed": v.failed}
    report(results, "fp8_check", f"fp8 check on {gpu}", table=v.table)
    return 1 if v.failed else 0


if __name__ == "__main__":
    sys.exit(main())
