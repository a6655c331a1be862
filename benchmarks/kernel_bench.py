"""Kernel benchmarks on one GPU (``python -P benchmarks/kernel_bench.py [--out DIR] [--quick]``).

Order (benchmarks/README.md): the card's ceilings first (device-to-device copy bandwidth,
bytes read + written; bf16 8192^3 matmul rate), then
- decode attention over the W3 grid (B in 1..256, C in {512, 2048}, llama3-8b heads: 32 q,
  8 KV, head dim 128, bf16, block 16): the bytes it must move (the B*C tokens of K and V, q,
  out) over its time, as a fraction of copy bandwidth. Timed as CUDA-graph replays over enough
  distinct KV sets that the working set is >= 4x L2, so no call reads a cached context;
- a small decode tile/split sweep at a few shapes, and the same for prefill;
- prefill attention (8 prompts x 2048 tokens, causal) against ``scaled_dot_product_attention``
  on the same data laid out contiguously (with ``enable_gqa`` and with K/V expanded to 32
  heads; the faster is the baseline);
- RMSNorm, fused add + RMSNorm, RoPE, SiLU-and-mul, KV write at 8192 tokens x 4096: fraction of
  copy bandwidth, beside the eager PyTorch references;
- the compiler's resource report of every compiled kernel variant.
Prints one table last; writes ``kernels_<date>_<gpu>.json`` to --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py (not the root)

from common import (
    copy_bandwidth,
    environment,
    gpu_slug,
    graph_median_ms,
    l2_cache_bytes,
    matmul_flops,
    median_ms,
    resource_report,
)

from metroline.kernels import activation, kv_cache, rmsnorm, rotary, rotary_kv, split_kv
from metroline.kernels import paged_attention as pa

H, HKV, D, BS = 32, 8, 128, 16  # llama3-8b attention, block 16
DT = torch.bfloat16
DEV = "cuda"


def paged_sets(batch: int, ctx: int, q_len: int, sets: int, seed: int = 0):
    """``sets`` independent batches of ``batch`` requests x ``ctx`` tokens over one pool whose
    blocks are scattered at random (as after a while of serving)."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    per_seq = math.ceil(ctx / BS)
    total = sets * batch * per_seq
    kc = torch.randn((total, BS, HKV, D), device=DEV, dtype=DT, generator=gen)
    vc = torch.randn((total, BS, HKV, D), device=DEV, dtype=DT, generator=gen)
    perm = torch.randperm(total, device=DEV, generator=gen).int()
    tables = [perm[s * batch * per_seq : (s + 1) * batch * per_seq].view(batch, per_seq)
              for s in range(sets)]
    queries = [torch.randn((batch * q_len, H, D), device=DEV, dtype=DT, generator=gen)
               for _ in range(sets)]
    outs = [torch.empty_like(q) for q in queries]
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
    cu = torch.arange(batch + 1, dtype=torch.int32, device=DEV) * q_len
    return kc, vc, tables, queries, outs, lens, cu


def decode_point(batch: int, ctx: int, copy_bw: float, *, config=None, num_splits=None) -> dict:
    kv_bytes = batch * ctx * HKV * D * 2 * DT.itemsize
    sets = max(1, min(256, math.ceil(4 * l2_cache_bytes() / kv_bytes)))
    kc, vc, tables, queries, outs, lens, cu = paged_sets(batch, ctx, 1, sets)
    scale = D**-0.5

    def run():
        for s in range(sets):
            pa.paged_attention(queries[s], kc, vc, tables[s], lens, cu, scale, 1, ctx,
                               out=outs[s], config=config, num_splits=num_splits)

    run()
    ms = graph_median_ms(run) / sets
    moved = kv_bytes + 2 * batch * H * D * DT.itemsize
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    auto = pa.attention_config(DT, D, H // HKV, 1, pa.decode_has_few_programs(batch * HKV, sms))
    splits = num_splits or pa.choose_num_splits(batch * HKV, ctx, sms, (config or auto).block_n)
    return {"B": batch, "C": ctx, "us": ms * 1e3, "bytes": moved, "sets": sets,
            "num_splits": splits, "block_n": (config or auto).block_n,
            "frac_copy_bw": moved / (ms * 1e-3) / copy_bw}


def bench_decode(copy_bw: float, batches=(1, 8, 32, 128, 256), contexts=(512, 2048)) -> list:
    rows = []
    for ctx in contexts:
        for batch in batches:
            row = decode_point(batch, ctx, copy_bw)
            rows.append(row)
            print(f"decode B={batch:<4} C={ctx:<5} {row['us']:8.1f} us "
                  f"splits={row['num_splits']:<3} keys/step={row['block_n']:<4} "
                  f"{100 * row['frac_copy_bw']:5.1f}% of copy bw",
                  flush=True)
    return rows


def sweep_decode(copy_bw: float, quick: bool, shapes=None) -> list[dict]:
    cfg = pa.AttentionConfig
    variants = {
        "default": (None, None),
        "default again": (None, None),  # the run-to-run spread, to judge the others by
        "n64 s2": (cfg(16, 4, 64, 4, 2), None),
        "n128 s2": (cfg(16, 4, 128, 4, 2), None),
        "n32 s2": (cfg(16, 4, 32, 4, 2), None),
        "splits=1": (None, 1),
    }
    if shapes is None:
        shapes = [(8, 2048), (32, 512), (256, 2048)]
        shapes += [] if quick else [(32, 2048), (128, 2048)]
    rows = []
    for batch, ctx in shapes:
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        rule = pa.attention_config(DT, D, H // HKV, 1, pa.decode_has_few_programs(batch * HKV, sms))
        auto = pa.choose_num_splits(batch * HKV, ctx, sms, rule.block_n)
        extra = {f"splits={n}": (None, n) for n in (2, 4, 8) if n != auto} if batch <= 32 else {}
        for name, (config, splits) in {**variants, **extra}.items():
            try:
                row = decode_point(batch, ctx, copy_bw, config=config, num_splits=splits)
            except Exception as exc:
                row = {"B": batch, "C": ctx, "error": repr(exc)[:200]}
            row["variant"] = name
            rows.append(row)
            print(f"decode sweep B={batch} C={ctx} {name:<10} "
                  f"{row.get('us', float('nan')):8.1f} us {100 * row.get('frac_copy_bw', 0):5.1f}%",
                  flush=True)
    return rows


def bench_prefill(matmul: float, quick: bool, batch: int = 8, seq: int = 2048) -> dict:
    kc, vc, tables, queries, outs, lens, cu = paged_sets(batch, seq, seq, 1, seed=1)
    table, query, out = tables[0], queries[0], outs[0]
    scale = D**-0.5
    # The same data, contiguous [B, heads, S, D], for SDPA.
    k = kc[table.long()].reshape(batch, seq, HKV, D).transpose(1, 2).contiguous()
    v = vc[table.long()].reshape(batch, seq, HKV, D).transpose(1, 2).contiguous()
    q = query.view(batch, seq, H, D).transpose(1, 2).contiguous()
    k_rep = k.repeat_interleave(H // HKV, dim=1).contiguous()
    v_rep = v.repeat_interleave(H // HKV, dim=1).contiguous()
    flops = 4 * batch * H * seq * seq * D / 2  # causal: half of the score matrix

    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa: dict = {}
    ref = F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True, scale=scale)
    calls = {
        "sdpa_expanded_kv": lambda: F.scaled_dot_product_attention(
            q, k_rep, v_rep, is_causal=True, scale=scale),
        "sdpa_enable_gqa": lambda: F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=True),
    }
    for name, fn in calls.items():
        try:
            sdpa[name] = median_ms(fn, reps=10, inner=5)
        except Exception as exc:
            sdpa[name] = None
            print(f"{name} failed: {exc!r}"[:200], flush=True)
    base_name = min((n for n in sdpa if sdpa[n]), key=lambda n: sdpa[n])
    base_ms = sdpa[base_name]
    backends = {}  # which backend the default picks is not reported by torch: time each
    for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        try:
            with sdpa_kernel(getattr(SDPBackend, backend)):
                backends[backend] = median_ms(calls["sdpa_expanded_kv"], reps=10, inner=5)
        except Exception as exc:
            backends[backend] = repr(exc)[:120]
    print(f"sdpa {sdpa} backends(expanded kv) {backends}", flush=True)

    cfg = pa.AttentionConfig
    variants = {
        "default": None,
        "m128 n32 w4 s3": cfg(128, 32, 32, 4, 3),
        "m128 n32 w4 s5": cfg(128, 32, 32, 4, 5),
        "m128 n64 w8 s2": cfg(128, 32, 64, 8, 2),
        "m64 n32 w4 s4": cfg(64, 16, 32, 4, 4),
    }
    if quick:
        variants = dict(list(variants.items())[:3])
    rows = []
    for name, config in variants.items():
        try:
            def run(config=config):
                pa.paged_attention(query, kc, vc, table, lens, cu, scale, seq, seq, out=out,
                                   config=config)
            run()
            err = float((out.view(batch, seq, H, D).transpose(1, 2).double() - ref.double()).norm()
                        / ref.double().norm())
            ms = median_ms(run, reps=10, inner=5)
            rows.append({"variant": name, "ms": ms, "tflops": flops / ms / 1e9,
                         "vs_sdpa": base_ms / ms, "rel_err_vs_sdpa": err})
        except Exception as exc:
            rows.append({"variant": name, "error": repr(exc)[:200]})
        print(f"prefill {name:<16} {rows[-1]}", flush=True)
    return {"batch": batch, "seq": seq, "flops": flops, "sdpa_ms": sdpa, "baseline": base_name,
            "sdpa_backends_ms": backends,
            "baseline_tflops": flops / base_ms / 1e9,
            "baseline_frac_matmul": flops / (base_ms * 1e-3) / matmul, "variants": rows}


def bench_elementwise(copy_bw: float, tokens: int = 8192, hidden: int = 4096) -> list[dict]:
    gen = torch.Generator(device=DEV).manual_seed(2)
    nbuf = 3  # rotate input sets so no call starts with its inputs in L2

    def rand(*shape):
        return [torch.randn(shape, device=DEV, dtype=DT, generator=gen) for _ in range(nbuf)]

    w = torch.ones(hidden, device=DEV, dtype=DT)
    xs, rs = rand(tokens, hidden), rand(tokens, hidden)
    gs = rand(tokens, 2 * hidden)
    qkvs = rand(tokens, (H + 2 * HKV) * D)
    freqs = torch.arange(8192, device=DEV).float()[:, None] * torch.rand(D // 2, device=DEV)
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    positions = torch.randint(0, 8192, (tokens,), device=DEV)
    pool = torch.empty((tokens // BS + 1, BS, HKV, D), device=DEV, dtype=DT)
    pool_v = torch.empty_like(pool)
    slots = torch.randperm(tokens, device=DEV)
    row = tokens * hidden * DT.itemsize
    qk_bytes = tokens * (H + HKV) * D * DT.itemsize
    kv_bytes = tokens * HKV * D * DT.itemsize

    def q_of(i):
        return qkvs[i][:, : H * D].view(tokens, H, D)

    def k_of(i):
        return qkvs[i][:, H * D : (H + HKV) * D].view(tokens, HKV, D)

    def v_of(i):
        return qkvs[i][:, (H + HKV) * D :].view(tokens, HKV, D)

    cases = {
        "rms_norm": (2 * row, lambda i, ref: (rmsnorm.rms_norm_ref if ref else rmsnorm.rms_norm)(
            xs[i], w, 1e-5)),
        "fused_add_rms_norm": (4 * row, lambda i, ref: (
            rmsnorm.fused_add_rms_norm_ref if ref else rmsnorm.fused_add_rms_norm)(
            xs[i], rs[i], w, 1e-5)),
        "rotary": (2 * qk_bytes + tokens * (D * 4 + 8), lambda i, ref: (
            rotary.rotary_embedding_ref if ref else rotary.rotary_embedding)(
            positions, q_of(i), k_of(i), cos_sin)),
        "silu_and_mul": (3 * row, lambda i, ref: (
            activation.silu_and_mul_ref if ref else activation.silu_and_mul)(gs[i])),
        "write_kv_cache": (4 * kv_bytes + tokens * 8, lambda i, ref: (
            kv_cache.write_kv_cache_ref if ref else kv_cache.write_kv_cache)(
            k_of(i), v_of(i), pool, pool_v, slots)),
        # The engine's launch: the two above in one (the key read once, never written back).
        "rotary_and_write_kv": (
            2 * (qk_bytes - kv_bytes) + 4 * kv_bytes + tokens * (D * 4 + 16),
            lambda i, ref: (rotary_kv.rotary_and_write_kv_ref if ref
                            else rotary_kv.rotary_and_write_kv)(
                positions, q_of(i), k_of(i), v_of(i), cos_sin, pool, pool_v, slots)),
    }
    rows = []
    for name, (moved, fn) in cases.items():
        result = {"kernel": name, "tokens": tokens, "hidden": hidden, "bytes": moved}
        # Triton: CUDA-graph replays of one call per buffer set (no launch overhead, as in the
        # engine's graphs). Torch eager (some ops sync, no graph): back-to-back calls.
        def triton_sets(fn=fn):
            for i in range(nbuf):
                fn(i, False)

        triton_sets()
        result["triton_us"] = graph_median_ms(triton_sets) / nbuf * 1e3
        counter = iter(range(10**9))
        result["torch_us"] = median_ms(
            lambda fn=fn, counter=counter: fn(next(counter) % nbuf, True), reps=10, inner=6) * 1e3
        for impl in ("triton", "torch"):
            ms = result[f"{impl}_us"] / 1e3
            result[f"{impl}_frac_copy_bw"] = moved / (ms * 1e-3) / copy_bw
        rows.append(result)
        print(f"{name:<20} triton {result['triton_us']:8.1f} us "
              f"{100 * result['triton_frac_copy_bw']:5.1f}%   torch {result['torch_us']:8.1f} us",
              flush=True)
    return rows


def table(report: dict) -> str:
    env, lines = report["environment"], []
    lines.append(f"{env['gpu']} | driver {env['driver']} | torch {env['torch']} | "
                 f"triton {env['triton']} | commit {env['commit'][:10]}")
    lines.append(f"copy bandwidth {report['copy_bw'] / 1e12:.2f} TB/s (read+write) | "
                 f"bf16 matmul {report['matmul_flops'] / 1e12:.0f} TFLOP/s")
    lines.append("decode attention (llama3-8b heads, bf16, block 16): % of copy bandwidth")
    lines.append("  C \\ B  " + "".join(f"{b:>8}" for b in (1, 8, 32, 128, 256)))
    for ctx in (512, 2048):
        cells = [r for r in report["decode"] if r["C"] == ctx]
        lines.append(f"  {ctx:<6} " + "".join(
            f"{100 * r['frac_copy_bw']:7.1f}{'*' if r['B'] * ctx >= 16384 else ' '}"
            for r in cells))
    lines.append("  (* = B*C >= 16k: target >= 70%)")
    pre = report.get("prefill")
    if pre:
        base_ms = pre["sdpa_ms"][pre["baseline"]]
        lines.append(f"prefill 8x2048 causal: baseline {pre['baseline']} {base_ms:.2f} ms "
                     f"({pre['baseline_tflops']:.0f} TFLOP/s)")
        for v in pre["variants"]:
            if "ms" in v:
                lines.append(f"  {v['variant']:<18} {v['ms']:6.2f} ms {v['tflops']:5.0f} TFLOP/s "
                             f"{v['vs_sdpa']:.2f}x sdpa (err {v['rel_err_vs_sdpa']:.1e})")
            else:
                lines.append(f"  {v['variant']:<18} {v['error'][:60]}")
    lines.append("elementwise 8192x4096 bf16: % of copy bandwidth (target >= 70%)")
    for r in report.get("elementwise", []):
        lines.append(f"  {r['kernel']:<20} triton {100 * r['triton_frac_copy_bw']:5.1f}% "
                     f"({r['triton_us']:.0f} us)  torch eager "
                     f"{100 * r['torch_frac_copy_bw']:5.1f}%")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--quick", action="store_true", help="smaller sweeps")
    args = parser.parse_args()
    torch.manual_seed(0)
    report: dict = {"environment": environment(), "parameters": {
        "heads": H, "kv_heads": HKV, "head_dim": D, "block_size": BS, "dtype": str(DT)}}
    print(report["environment"], flush=True)
    report["copy_bw"] = copy_bandwidth()
    report["matmul_flops"] = matmul_flops()
    sections = {
        "decode": lambda: bench_decode(report["copy_bw"]),
        "elementwise": lambda: bench_elementwise(report["copy_bw"]),
        "prefill": lambda: bench_prefill(report["matmul_flops"], args.quick),
        "decode_sweep": lambda: sweep_decode(report["copy_bw"], args.quick),
    }
    for name, fn in sections.items():
        try:
            report[name] = fn()
        except Exception:
            report[f"{name}_error"] = traceback.format_exc()[-2000:]
            print(report[f"{name}_error"], flush=True)
        torch.cuda.empty_cache()
    report["resources"] = {
        fn.__name__ if hasattr(fn, "__name__") else str(fn): resource_report(fn)
        for fn in (pa._paged_attention_kernel, split_kv._merge_splits_kernel,
                   rmsnorm._rms_norm_kernel, rotary._rotary_kernel,
                   activation._silu_and_mul_kernel, kv_cache._write_kv_cache_kernel)
    }
    date = dt.date.today().isoformat()
    path = Path(args.out) / f"kernels_{date}_{gpu_slug(report['environment']['gpu'])}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwrote {path}\n")
    print(table(report) if "decode" in report else "decode section failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
