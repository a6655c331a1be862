"""W8-text - speculative decoding on real text: n-gram acceptance with the demo model's real
weights (issue 20), where W8's dummy weights cannot show it.

``python -P benchmarks/spec_text.py [--prompts 16] [--k 4] [--new-tokens 96]``

The workload is "edit this code": each prompt is a held-out standard-library source excerpt
(normalised as the demo model's corpus is, ``engine/demo/corpus.py``), then a marker line,
then the excerpt's first lines again; the answer continues the excerpt, so it is in the
prompt (what prompt lookup is for). One engine without speculation and one with n-gram drafts
run the same greedy requests back to back; the table gives the acceptance (accepted /
drafted), the mean acceptance length, TPOT of each (the demo model is small: on a GPU its
steps are bound by the host, so the ratio says what speculation saves in steps rather than
in weight reads), and whether the outputs are equal (they must be).
"""

from __future__ import annotations

import argparse
import logging
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, gpu_slug
from records import save_record

EXCERPT_LINES = 24
REPEATED_LINES = 4
#: Longest excerpt kept (characters): the prompt and the answer stay within the demo
#: model's 1024 positions.
MAX_EXCERPT_CHARS = 1500
MARKER = "# the same code again, unchanged:\n"


def edit_prompts(count: int) -> list[str]:
    """``count`` prompts: excerpt, marker, the excerpt's first lines (held-out files only)."""
    from metroline.engine.demo.corpus import (
        DEFAULT_EXCLUDE,
        is_heldout,
        stdlib_documents,
    )

    root = Path(sysconfig.get_paths()["stdlib"])
    docs = [d for d in stdlib_documents(root, DEFAULT_EXCLUDE) if is_heldout(d, 50)]
    prompts = []
    for doc in docs:
        lines = doc.text.splitlines(keepends=True)
        if len(lines) < EXCERPT_LINES:
            continue
        excerpt = "".join(lines[:EXCERPT_LINES])
        if len(excerpt) > MAX_EXCERPT_CHARS:
            continue
        prompts.append(excerpt + MARKER + "".join(lines[:REPEATED_LINES]))
        if len(prompts) == count:
            break
    return prompts


def timed(llm: Any, prompts: list[str], params: Any) -> tuple[float, list[list[int]]]:
    """(TPOT seconds of the batch, output token ids), after one warm-up run."""
    llm.generate(prompts, params, use_tqdm=False)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    tokens = [o.outputs[0].token_ids for o in outputs]
    return seconds / max(1, max(map(len, tokens))), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    from metroline.engine import LLM, SamplingParams
    from metroline.engine.demo import demo_model_path

    env = environment() if torch.cuda.is_available() else {"gpu": "cpu"}
    prompts = edit_prompts(args.prompts)
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    ngram = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": 2,
             "prompt_lookup_max": 5}  # fmt: skip
    common = {"model": str(demo_model_path()), "enable_prefix_caching": False,
              "kv_cache_memory_bytes": 2**30}  # two engines in one process: no profiling
    plain = LLM(**common)
    spec = LLM(speculative_config=ngram, **common)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        # Batch b: the prompts in groups of b, one generate call per group.
        groups = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
        plain_tpot = spec_tpot = 0.0
        equal = True
        before = spec.engine_core.stats()
        for group in groups:
            tpot, want = timed(plain, group, params)
            plain_tpot += tpot / len(groups)
            tpot, got = timed(spec, group, params)
            spec_tpot += tpot / len(groups)
            equal = equal and got == want
        after = spec.engine_core.stats()
        drafted = after.spec_num_draft_tokens - before.spec_num_draft_tokens
        accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
        verified = after.spec_num_drafts - before.spec_num_drafts
        rows.append({
            "batch": batch, "prompts": len(prompts), "plain_tpot_s": plain_tpot,
            "ngram_tpot_s": spec_tpot, "vs_plain": spec_tpot / plain_tpot,
            "acceptance": accepted / drafted if drafted else 0.0,
            "acceptance_length": 1 + accepted / verified if verified else 1.0,
            "equal_to_plain": equal,
        })  # fmt: skip
    spec.shutdown()
    plain.shutdown()
    record = {"benchmark": "spec-decode-W8-text", "environment": env,
              "parameters": vars(args) | {"out": str(args.out)}, "rows": rows}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    save_record(args.out, [gpu_slug(env["gpu"]), "W8-text", "demo", f"k{args.k}"], record)
    print(f"\nW8-text: n-gram drafts on the demo model (real weights), K={args.k}, "
          f"{len(prompts)} edit prompts, {args.new_tokens} new tokens, {env['gpu']}")  # fmt: skip
    print(f"{'B':>3s} {'plain ms':>9s} {'ngram ms':>9s} {'vs plain':>8s} {'accept':>7s} "
          f"{'length':>6s} {'equal':>6s}")  # fmt: skip
    for r in rows:
        print(f"{r['batch']:3d} {r['plain_tpot_s'] * 1e3:9.2f} {r['ngram_tpot_s'] * 1e3:9.2f} "
              f"{r['vs_plain']:8.2f} {r['acceptance']:7.0%} {r['acceptance_length']:6.2f} "
              f"{r['equal_to_plain']!s:>6s}")  # fmt: skip


if __name__ == "__main__":
    main()
