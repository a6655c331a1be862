"""W8 - speculative decoding at low batch (issue 20): time per output token at batch B with
and without draft tokens, one engine for each, back to back.

``python -P benchmarks/spec_decode.py --model llama3-8b [--batches 1,8] [--k 4]``

Workloads (prompt ``--prompt-len`` tokens, ``--new-tokens`` greedy tokens each, no EOS):

- ``plain``: no speculation, the engine's defaults (asynchronous scheduling on CUDA); its
  greedy outputs are recorded for the replayed runs.
- ``forced-A``: every step drafts K tokens and verification accepts each draft with
  probability A (1.0, 0.7, 0.5; Leviathan et al.'s alpha), forced by construction: the
  benchmark replaces the greedy verifier in this process with one that draws the acceptance
  (the target's logits are still computed for all K + 1 positions, so the step costs what a
  real one does). A step then emits ``(1 - A**(K+1)) / (1 - A)`` tokens on average; vLLM's
  acceptance rate (accepted / drafted) is lower, as drafts after the first rejected one
  count as drafted. Replaying a first pass's greedy tokens does not force acceptance on
  dummy weights in bf16: a verify step computes a position with K + 1 rows where a decode
  step has one, the rounding differs, and the random model's near-tied argmax flips at once
  (measured: 0% accepted at batch 1).
- ``ngram``: the prompt-lookup proposer on prompts that repeat one phrase (prompts that
  contain their answer); acceptance as measured (with dummy weights it says little about
  real text).
- ``draft`` and ``draft-forced-A``: a draft model of shape ``--draft-model`` (default
  llama3-1b, dummy weights) proposes K tokens each step; ``draft`` verifies them for real
  (two unrelated random models: acceptance near zero, as measured), ``draft-forced-A``
  with the forced verifier above, so the step pays the draft model's real cost (its
  mirrored pass and K - 1 single-token passes) at a chosen acceptance. ``draft_s_per_step``
  is the time inside the draft phase (it ends by reading the drafts back, so it holds the
  draft's GPU time).

TPOT is (time of the whole batch - time of a one-token batch) / (new tokens - 1), the
median of ``--repeats`` runs; proposer time is measured separately (host seconds inside the
proposer per step). The n-gram run reports whether its tokens equal the plain run's (they
need not on dummy weights in bf16, for the reason above; exactness is tested on CPU and on
CUDA with tiny fp32 checkpoints: tests/engine/test_spec_decode.py).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, gpu_slug
from records import save_record
from shapes import SHAPES, write_shape

from metroline.engine.config import EngineArgs
from metroline.engine.flags import add_flags, flag_values

ENGINE_FLAGS_FIXED = ("model", "load_format", "max_model_len", "enable_prefix_caching",
                      "speculative_config")  # fmt: skip
ACCEPTANCE = (1.0, 0.7, 0.5)
#: Each engine's KV pool: both engines live in one process, so neither profiles memory.
KV_BYTES = 4 * 2**30


def prompts_for(batch: int, length: int, vocab: int, repetitive: bool) -> list[list[int]]:
    rng = random.Random(batch * 7919 + length + repetitive)
    if not repetitive:
        return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(batch)]
    phrase_len = 64
    prompts = []
    for _ in range(batch):
        phrase = [rng.randrange(100, vocab) for _ in range(phrase_len)]
        prompts.append((phrase * (length // phrase_len + 1))[:length])
    return prompts


def timed_generate(llm: Any, prompts: list[list[int]], new_tokens: int, repeats: int):
    """(TPOT seconds median, outputs of the last run)."""
    from metroline.engine import SamplingParams

    full = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate(prompts, full, use_tqdm=False)  # warm-up (graphs, kernels)
    tpots, outputs = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        llm.generate(prompts, first, use_tqdm=False)
        one = time.perf_counter() - started
        started = time.perf_counter()
        outputs = llm.generate(prompts, full, use_tqdm=False)
        whole = time.perf_counter() - started
        tpots.append((whole - one) / (new_tokens - 1))
    return statistics.median(tpots), [o.outputs[0].token_ids for o in outputs]


def forced_verifier(alpha: float, seed: int):
    """A stand-in for ``verify_greedy`` that accepts each draft with probability ``alpha``
    (a prefix: the first refused draft ends the run), then emits the target's argmax at the
    first refused position, or after all drafts."""
    import torch

    from metroline.engine.spec_decode.config import DRAFT_PAD_TOKEN
    from metroline.engine.spec_decode.rejection import Verified

    generator = torch.Generator().manual_seed(seed)

    def verify(target_argmax, draft_token_ids, num_drafts) -> Verified:
        rows, width = draft_token_ids.shape
        device = target_argmax.device
        draws = torch.rand(rows, width, generator=generator).to(device) < alpha
        positions = torch.arange(width, device=device)
        draws &= positions[None, :] < num_drafts[:, None]
        accepted = draws.long().cumprod(dim=1).sum(dim=1)
        index = torch.arange(rows, device=device)
        tokens = torch.full((rows, width + 1), DRAFT_PAD_TOKEN, dtype=torch.long, device=device)
        tokens[:, :width] = torch.where(
            positions[None, :] < accepted[:, None], draft_token_ids.long(), DRAFT_PAD_TOKEN
        )
        tokens[index, accepted] = target_argmax.long()[index, accepted]
        return Verified(accepted, tokens)

    return verify


def full_drafts(request, room: int) -> list[int]:
    """``room`` drafts every step (their values do not matter to a forced verifier)."""
    return [request.all_token_ids[-1]] * room


class TimedProposer:
    """Wraps a proposer, adding up the host seconds it takes."""

    def __init__(self, propose) -> None:
        self.propose, self.seconds, self.calls = propose, 0.0, 0

    def __call__(self, *args):
        started = time.perf_counter()
        try:
            return self.propose(*args)
        finally:
            self.seconds += time.perf_counter() - started
            self.calls += 1


def run_mode(llm, name, alpha, batch, repetitive, prompts, reference, base, args,
             spec_sampling, real_verifier) -> dict[str, Any]:  # fmt: skip
    """One workload on ``llm`` (an engine with speculation): its row of the table."""
    forced = alpha is not None
    spec_sampling.verify_greedy = forced_verifier(alpha, seed=batch) if forced else real_verifier
    speculation = llm.engine_core.scheduler.speculation
    drafter = llm.engine_core.executor.worker.model_runner.drafter
    timer = None
    if drafter is None:
        timer = TimedProposer(full_drafts if forced else speculation.propose_ngram)
        speculation.propose = timer
    else:  # the draft model proposes on the worker
        if not isinstance(drafter.propose, TimedProposer):
            drafter.propose = TimedProposer(drafter.propose)
        timer = drafter.propose
        timer.seconds, timer.calls = 0.0, 0
    before = llm.engine_core.stats()
    tpot, tokens = timed_generate(llm, prompts, args.new_tokens, args.repeats)
    after = llm.engine_core.stats()
    drafted = after.spec_num_draft_tokens - before.spec_num_draft_tokens
    verified = after.spec_num_drafts - before.spec_num_drafts
    accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
    steps = after.num_steps - before.num_steps
    return {
        "batch": batch, "workload": name, "repetitive": repetitive,
        "tpot_s": tpot, "vs_plain": tpot / base,
        "acceptance": accepted / drafted if drafted else 0.0,
        "draft_tokens": drafted, "accepted_tokens": accepted,
        "acceptance_length": 1 + accepted / verified if verified else 1.0,
        "proposer_s_per_step": timer.seconds / max(1, steps),
        "equal_to_plain": None if forced else tokens == reference,
    }  # fmt: skip


def profile_steps(llm, name: str, batch: int, args) -> dict[str, float]:
    """GPU time by kernel family of 10 steady steps of ``batch`` requests (the workload's
    verifier still in place), and the profiler's table under ``--out``."""
    from step_profile import add_requests, profiled_steps

    core = llm.engine_core
    ids = [f"prof-{name}-{i}" for i in range(batch)]
    add_requests(core, ids, args.prompt_len, None, llm.config.model.arch.vocab_size, batch)
    while not all(r.num_output_tokens >= 1 for r in core.scheduler.requests.values()):
        core.step()
    for _ in range(3):
        core.step()
    row = profiled_steps(core, 10, args.out, name)
    core.finish_requests(ids)
    core.step()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="", help="only these workloads (comma list)")
    parser.add_argument("--profile", default="",
                        help="after these workloads (comma list), a torch-profiler table of "
                             "10 steps at each batch, under --out")  # fmt: skip
    parser.add_argument("--draft-model", default="llama3-1b",
                        help="shape of the draft model ('' for no draft-model runs)")  # fmt: skip
    add_flags(parser.add_argument_group("engine"), EngineArgs, skip=ENGINE_FLAGS_FIXED,
              defaults={"dtype": "bfloat16", "kv_cache_memory_bytes": KV_BYTES})  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch

    from metroline.engine import LLM
    from metroline.engine.worker import spec_sampling

    env = environment() if torch.cuda.is_available() else {"gpu": "cpu"}
    batches = [int(b) for b in args.batches.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    engine = flag_values(args, EngineArgs, skip=ENGINE_FLAGS_FIXED)
    common = dict(load_format="dummy", max_model_len=args.prompt_len + args.new_tokens + 64,
                  enable_prefix_caching=False, **engine)  # fmt: skip
    ngram = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": 2,
             "prompt_lookup_max": 5}  # fmt: skip
    rows: list[dict[str, Any]] = []
    wanted = set(filter(None, args.modes.split(",")))
    with tempfile.TemporaryDirectory() as tmp:
        path = str(write_shape(args.model, Path(tmp) / args.model))
        plain = LLM(model=path, **common)
        spec = LLM(model=path, speculative_config=ngram, **common)
        engines = {"ngram": spec}
        if args.draft_model:
            draft_path = str(write_shape(args.draft_model, Path(tmp) / args.draft_model))
            drafting = {"method": "draft_model", "model": draft_path,
                        "num_speculative_tokens": args.k}  # fmt: skip
            engines["draft"] = LLM(model=path, speculative_config=drafting, **common)
        vocab = plain.config.model.arch.vocab_size
        real_verifier = spec_sampling.verify_greedy
        for batch in batches:
            for repetitive in (False, True):
                prompts = prompts_for(batch, args.prompt_len, vocab, repetitive)
                base, reference = timed_generate(plain, prompts, args.new_tokens, args.repeats)
                rows.append({"batch": batch, "workload": "plain", "repetitive": repetitive,
                             "tpot_s": base})  # fmt: skip
                if repetitive:
                    modes = [("ngram", None, "ngram")]
                else:
                    modes = [(f"forced-{a:.1f}", a, "ngram") for a in ACCEPTANCE]
                    if "draft" in engines:
                        modes += [("draft", None, "draft")]
                        modes += [(f"draft-forced-{a:.1f}", a, "draft") for a in ACCEPTANCE]
                for name, alpha, engine_name in modes:
                    if wanted and name not in wanted:
                        continue
                    rows.append(run_mode(engines[engine_name], name, alpha, batch, repetitive,
                                         prompts, reference, base, args, spec_sampling,
                                         real_verifier))  # fmt: skip
                    print(rows[-1], flush=True)
                    if name in args.profile.split(","):
                        rows[-1]["profile"] = profile_steps(
                            engines[engine_name], f"{name}-b{batch}", batch, args
                        )
                        print(rows[-1]["profile"], flush=True)
        host = {"plain": plain.engine_core.host_timings()}
        host |= {name: llm.engine_core.host_timings() for name, llm in engines.items()}
        for llm in [*engines.values(), plain]:
            llm.shutdown()
    record = {
        "benchmark": "spec-decode-W8",
        "environment": env,
        "parameters": vars(args) | {"out": str(args.out)},
        "rows": rows,
        "host_timings": host,
    }
    save_record(args.out, [gpu_slug(env["gpu"]), "W8", args.model, f"k{args.k}"], record)
    print(f"\nW8 speculative decoding on {args.model}, K={args.k}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, {env['gpu']}")  # fmt: skip
    print(f"{'B':>3s} {'workload':>17s} {'TPOT ms':>8s} {'vs plain':>8s} {'accept':>7s} "
          f"{'length':>6s} {'prop us':>8s} {'equal':>6s}")  # fmt: skip
    for r in rows:
        print(
            f"{r['batch']:3d} {r['workload'] + ('*' if r['repetitive'] else ''):>17s} "
            f"{r['tpot_s'] * 1e3:8.2f} {r.get('vs_plain', 1.0):8.2f} "
            f"{r.get('acceptance', 0):7.0%} {r.get('acceptance_length', 1):6.2f} "
            f"{r.get('proposer_s_per_step', 0) * 1e6:8.1f} "
            f"{r.get('equal_to_plain', '')!s:>6s}"
        )

    for engine_name, ranks in host.items():
        phases = ranks[0] if ranks else {}
        if phases:
            print(f"host phases, {engine_name} engine (ms per call): " + ", ".join(
                f"{k} {v['mean_ms']:.3f}x{v['calls']}" for k, v in phases.items()
            ))  # fmt: skip


if __name__ == "__main__":
    main()
