"""Tile sweep of the paged attention kernel over bf16 and fp8 caches, at serving batch sizes.

``python -P benchmarks/attention_sweep.py [--out DIR] [--kv bf16,fp8] [--quick]``

Decode (one query token per request, llama3-8b heads: 32 q, 8 KV, head dim 128, block 16) at
the batches a busy server runs (64-1024 requests, contexts 512-2048, equal or ragged), where
no context is split: each tile shape against the rule's (:func:`metroline.kernels.attention_tiles.
attention_config`), as the bytes moved over the time, a fraction of copy bandwidth; then
prompt chunks (8 x 2048 tokens, causal) over the same tile shapes of the chunk rule. Every
call reads a working set of at least 4x L2 (several KV sets), timed as CUDA-graph replays. An
fp8 cache holds the bf16 data rounded to float8_e4m3fn with scales of 1.0; each variant's
difference from the rule's output is recorded. Decodes take their requests longest first, as
the engine launches them (``seq_order``). Prints a line per shape and writes
``<date>-attention-sweep-<gpu>.json`` to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import copy_bandwidth, environment, gpu_slug, graph_median_ms, l2_cache_bytes
from records import save_record

from metroline.kernels import paged_attention as pa

H, HKV, D, BS = 32, 8, 128, 16
QDT = torch.bfloat16
FP8 = torch.float8_e4m3fn
DEV = "cuda"
GROUP = H // HKV

#: (batch, longest context[, shortest]): with a shortest context, each request's length is
#: drawn uniformly between the two (W1's decode batches: prompts of 64-1024 tokens, ~200
#: tokens into their answers), where the tail of long requests weighs as it does in serving.
DECODE_SHAPES = [(64, 2048), (256, 512), (256, 2048), (1024, 512), (1024, 1024)]
DECODE_SHAPES += [(512, 1224, 264), (1000, 1224, 264), (1000, 2048, 64)]
QUICK_DECODE_SHAPES = [(256, 512), (1000, 1224, 264)]
#: (block_n, num_warps, num_stages) of the one-token tile (16 rows: 4 tokens' worth of heads).
#: Fewer warps a program leave more programs resident an SM (decode tiles are 16 rows).
DECODE_TILES = [(n, w, s) for n in (32, 64, 128, 256) for w in (2, 4, 8) for s in (2, 3, 4)]
DECODE_TILES += [(32, 1, 2), (64, 1, 2)]
#: (block_m, block_n, num_warps, num_stages) of the chunk tile.
PREFILL_TILES = [(128, n, w, s) for n in (32, 64) for w in (4, 8) for s in (2, 3, 4)]


def kv_sets(
    batch: int, ctx: int, q_len: int, kv: str, min_ctx: int | None = None, seed: int = 0
) -> dict:
    """Enough independent batches over one scattered pool that a call never reads L2; with
    ``min_ctx``, context lengths drawn uniformly from ``[min_ctx, ctx]``."""
    per_seq = math.ceil(ctx / BS)
    itemsize = 1 if kv == "fp8" else 2
    draw = random.Random(seed)
    lens = [ctx if min_ctx is None else draw.randint(min_ctx, ctx) for _ in range(batch)]
    kv_bytes = sum(lens) * HKV * D * 2 * itemsize
    sets = max(1, min(64, math.ceil(4 * l2_cache_bytes() / kv_bytes)))
    gen = torch.Generator(device=DEV).manual_seed(seed)
    total = sets * batch * per_seq
    caches = []
    for _ in range(2):
        cache = torch.randn((total, BS, HKV, D), device=DEV, dtype=QDT, generator=gen)
        caches.append(cache.to(FP8) if kv == "fp8" else cache)
    unit = torch.ones(HKV, device=DEV)
    perm = torch.randperm(total, device=DEV, generator=gen).int()
    span = batch * per_seq
    return {
        "k": caches[0],
        "v": caches[1],
        "tables": [perm[s * span : (s + 1) * span].view(batch, per_seq) for s in range(sets)],
        "queries": [
            torch.randn((batch * q_len, H, D), device=DEV, dtype=QDT, generator=gen)
            for _ in range(sets)
        ],
        "lens": torch.tensor(lens, dtype=torch.int32, device=DEV),
        # As the engine launches decodes (VarlenLayout.stage): longest context first.
        "order": torch.tensor(
            sorted(range(batch), key=lambda b: -lens[b]), dtype=torch.int32, device=DEV
        ),
        "cu": torch.arange(batch + 1, dtype=torch.int32, device=DEV) * q_len,
        "scales": (unit, unit) if kv == "fp8" else (None, None),
        "kv_bytes": kv_bytes,
        "sets": sets,
    }


def time_point(data: dict, q_len: int, ctx: int, config, copy_bw: float) -> dict:
    outs = [torch.empty_like(q) for q in data["queries"]]
    k_scale, v_scale = data["scales"]

    def run():
        for s in range(data["sets"]):
            pa.paged_attention(
                data["queries"][s], data["k"], data["v"], data["tables"][s], data["lens"],
                data["cu"], D**-0.5, q_len, ctx, out=outs[s], num_splits=1, config=config,
                k_scale=k_scale, v_scale=v_scale, seq_order=data["order"],
            )  # fmt: skip

    run()
    ms = graph_median_ms(run) / data["sets"]
    moved = data["kv_bytes"] + 2 * data["queries"][0].numel() * QDT.itemsize
    return {"us": ms * 1e3, "frac_copy_bw": moved / (ms * 1e-3) / copy_bw, "out": outs[0]}


def sweep(kv: str, shapes, tiles, q_len_of, make_config, copy_bw: float) -> list[dict]:
    rows = []
    for batch, ctx, *shortest in shapes:
        min_ctx = shortest[0] if shortest else None
        q_len = q_len_of(ctx)
        data = kv_sets(batch, ctx, q_len, kv, min_ctx)
        base = time_point(data, q_len, ctx, None, copy_bw)
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        few = pa.decode_has_few_programs(batch * HKV, sms)
        rule = pa.attention_config(QDT, D, GROUP, q_len, few, kv == "fp8")
        point = {"kv": kv, "B": batch, "C": ctx, "C_min": min_ctx or ctx, "q_len": q_len,
                 "rule": dataclasses.astuple(rule)}  # fmt: skip
        point["rule_us"] = base["us"]
        point["rule_frac_copy_bw"] = base["frac_copy_bw"]
        variants = []
        for tile in tiles:
            try:
                config = make_config(tile)
                got = time_point(data, q_len, ctx, config, copy_bw)
                diff = got["out"].float() - base["out"].float()
                variants.append({
                    "tile": tile, "us": got["us"],
                    "max_abs_diff": float(diff.abs().max()),
                    "rel_diff": float(diff.norm() / base["out"].float().norm()),
                    "vs_rule": base["us"] / got["us"],
                })  # fmt: skip
            except Exception as exc:  # out of shared memory or registers: reported
                variants.append({"tile": tile, "error": repr(exc)[:160]})
        point["variants"] = variants
        best = min((v for v in variants if "us" in v), key=lambda v: v["us"], default=None)
        point["best"] = best
        if best is None:  # every tile failed (shared memory, registers): reported as such
            print(f"{kv} B={batch} C={ctx}: no tile ran", flush=True)
            rows.append(point)
            continue
        print(
            f"{kv} B={batch:<5} C={min_ctx or ctx}-{ctx:<5} q={q_len:<5} rule {rule.block_n}/"
            f"{rule.num_warps}/{rule.num_stages} {base['us']:8.1f} us"
            f" ({100 * base['frac_copy_bw']:.0f}% copy bw)"
            f" | best {best['tile']} {best['us']:8.1f} us ({best['vs_rule']:.2f}x)",
            flush=True,
        )
        rows.append(point)
        del data
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--kv", default="bf16,fp8", help="cache types, comma-separated")
    parser.add_argument("--quick", action="store_true", help="two decode shapes, no prefill")
    args = parser.parse_args()
    kinds = args.kv.split(",")
    if not set(kinds) <= {"bf16", "fp8"}:
        parser.error("--kv takes bf16 and/or fp8")
    copy_bw = copy_bandwidth()
    cfg = pa.AttentionConfig
    record = {"benchmark": "attention-sweep", "environment": environment(),
              "copy_bw": copy_bw, "decode": [], "prefill": []}  # fmt: skip
    shapes = QUICK_DECODE_SHAPES if args.quick else DECODE_SHAPES
    for kv in kinds:
        record["decode"] += sweep(
            kv, shapes, DECODE_TILES, lambda ctx: 1,
            lambda t: cfg(16, 4, t[0], t[1], t[2]), copy_bw,
        )  # fmt: skip
        if not args.quick:
            record["prefill"] += sweep(
                kv, [(8, 2048)], PREFILL_TILES, lambda ctx: ctx,
                lambda t: cfg(t[0], t[0] // GROUP, t[1], t[2], t[3]), copy_bw,
            )  # fmt: skip
    gpu = gpu_slug(record["environment"]["gpu"])
    path = save_record(args.out, ["attention-sweep", gpu], record)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
