"""Attention of a mixed step on one GPU: prompt chunks beside decodes, one launch or two.

``python -P benchmarks/mixed_attention.py [--out DIR]``. llama3-8b heads (32 q, 8 KV, head
dim 128), bf16, block 16, KV blocks scattered at random over one pool. Each case is
``CHUNKS`` prompt chunks of ``CHUNK`` new tokens (no prefix) beside ``decodes`` one-token
requests at context ``ctx``, timed as CUDA-graph replays; ``one launch`` is every request in
the chunk tile shape (``mixed=False``), ``two launches`` the decodes apart in the decode shape
(``mixed=True``, the engine's default). Both are checked against each other. Writes
``mixed_attention_<date>_<gpu>.json``; prints a table last.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py (not the root)

from common import environment, gpu_slug, graph_median_ms

from metroline.kernels import paged_attention as pa

H, HKV, D, BS = 32, 8, 128, 16
DT = torch.bfloat16
CHUNKS, CHUNK = 8, 1024
CASES = [(0, 1024), (64, 1024), (256, 1024), (1000, 1024), (256, 4096)]  # (decodes, ctx)


def case(decodes: int, ctx: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(decodes + ctx)
    q_lens = [1] * decodes + [CHUNK] * CHUNKS
    seq_lens = [ctx] * decodes + [CHUNK] * CHUNKS
    per_seq = [math.ceil(s / BS) for s in seq_lens]
    total = sum(per_seq)
    kc = torch.randn((total, BS, HKV, D), device="cuda", dtype=DT, generator=gen)
    vc = torch.randn_like(kc)
    perm = torch.randperm(total, device="cuda", generator=gen).int()
    tables = torch.zeros((len(q_lens), max(per_seq)), dtype=torch.int32, device="cuda")
    used = 0
    for row, n in enumerate(per_seq):
        tables[row, :n] = perm[used : used + n]
        used += n
    query = torch.randn((sum(q_lens), H, D), device="cuda", dtype=DT, generator=gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    cu = torch.tensor(
        [0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda"
    )
    outs = {m: torch.empty_like(query) for m in (False, True)}
    row: dict = {"decodes": decodes, "ctx": ctx, "chunks": CHUNKS, "chunk": CHUNK}
    for mixed, out in outs.items():

        def run(mixed=mixed, out=out):
            pa.paged_attention(
                query,
                kc,
                vc,
                tables,
                lens,
                cu,
                D**-0.5,
                max(q_lens),
                max(seq_lens),
                out=out,
                mixed=mixed,
            )

        run()
        row["two_launches_us" if mixed else "one_launch_us"] = graph_median_ms(run) * 1e3
    diff = (outs[True].float() - outs[False].float()).norm() / outs[False].float().norm()
    row["rel_diff"] = float(diff)
    row["speedup"] = row["one_launch_us"] / row["two_launches_us"]
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args()
    report: dict = {"environment": environment(), "rows": [case(*c) for c in CASES]}
    date = dt.date.today().isoformat()
    path = Path(args.out) / f"mixed_attention_{date}_{gpu_slug(report['environment']['gpu'])}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))
    env = report["environment"]
    print(f"{env['gpu']} | torch {env['torch']} | triton {env['triton']} | {env['commit'][:10]}")
    print(
        f"{CHUNKS} chunks x {CHUNK} tokens + decodes | one launch us | two launches us | "
        "speedup | rel diff"
    )
    for r in report["rows"]:
        print(
            f"  {r['decodes']:>5} decodes ctx {r['ctx']:<5} | {r['one_launch_us']:9.1f} | "
            f"{r['two_launches_us']:9.1f} | {r['speedup']:5.2f}x | {r['rel_diff']:.1e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
