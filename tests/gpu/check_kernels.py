"""GPU check of every Triton kernel at real sizes against its PyTorch reference (run on an
H100/H200: ``python -P tests/gpu/check_kernels.py [--out DIR]``; not collected by pytest).

Error measure: relative Frobenius error ``|out - ref| / |ref|`` against the fp32 reference on
the same (16-bit) inputs; bounds 1e-2 for bf16/fp16, 1e-5 for fp32 (true fp32 dots, no tf32).
Caches are NaN wherever no request's context reaches and outputs start as NaN, so an
out-of-context read or an unwritten row shows as NaN. Also checked: int64 offsets in a pool of
more than 2**31 elements, and a split-KV decode captured in a CUDA graph at short contexts and
replayed at longer ones (the partitioning must follow the device-side lengths).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from metroline.kernels.activation import silu_and_mul, silu_and_mul_ref
from metroline.kernels.kv_cache import write_kv_cache, write_kv_cache_ref
from metroline.kernels.paged_attention import paged_attention, paged_attention_ref
from metroline.kernels.rmsnorm import (
    fused_add_rms_norm,
    fused_add_rms_norm_ref,
    rms_norm,
    rms_norm_ref,
)
from metroline.kernels.rotary import rotary_embedding, rotary_embedding_ref

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rotary_kv_check import check_rotary_kv

DEV = "cuda"
RESULTS: list[dict] = []


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def record(name: str, dtype: torch.dtype, err: float, bound: float, **extra) -> None:
    ok = math.isfinite(err) and err < bound
    RESULTS.append(
        {
            "check": name,
            "dtype": str(dtype).removeprefix("torch."),
            "rel_err": err,
            "bound": bound,
            "ok": ok,
            **extra,
        }
    )
    print(
        f"{'ok  ' if ok else 'FAIL'} {name:<48} {dtype!s:<15} {err:.2e} < {bound:.0e}", flush=True
    )


def bound_for(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-2


def make_batch(
    q_lens,
    seq_lens,
    *,
    num_heads,
    num_kv_heads,
    head_dim,
    block_size,
    dtype,
    num_blocks=None,
    high_blocks=False,
    seed=0,
):
    """Random paged batch on the GPU; blocks are scattered at random over the pool (or, with
    ``high_blocks``, taken from its end, to exercise offsets past 2**31 elements)."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    blocks_per_seq = [math.ceil(s / block_size) for s in seq_lens]
    needed = sum(blocks_per_seq) + 1
    num_blocks = num_blocks or needed + 8
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEV)
    value_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEV)
    if high_blocks:
        order = torch.arange(num_blocks - needed, num_blocks, device=DEV)
    else:
        order = torch.randperm(num_blocks, device=DEV, generator=gen)
    poison = order[-1]
    max_blocks = max(blocks_per_seq) + 1
    block_tables = torch.empty((len(seq_lens), max_blocks), dtype=torch.int32, device=DEV)
    block_tables.fill_(int(poison))
    flat_k = key_cache.view(-1, num_kv_heads, head_dim)
    flat_v = value_cache.view(-1, num_kv_heads, head_dim)
    used = 0
    for b, seq_len in enumerate(seq_lens):
        blocks = order[used : used + blocks_per_seq[b]]
        used += blocks_per_seq[b]
        block_tables[b, : len(blocks)] = blocks.int()
        pos = torch.arange(seq_len, device=DEV)
        slots = blocks[pos // block_size] * block_size + pos % block_size
        kv_shape = (seq_len, num_kv_heads, head_dim)
        flat_k[slots] = torch.randn(kv_shape, device=DEV, generator=gen).to(dtype)
        flat_v[slots] = torch.randn(kv_shape, device=DEV, generator=gen).to(dtype)
    query = torch.randn((sum(q_lens), num_heads, head_dim), device=DEV, generator=gen).to(dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    return query, key_cache, value_cache, block_tables, lens, cu


def check_attention(
    name,
    q_lens,
    seq_lens,
    *,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    block_size=16,
    dtype=torch.bfloat16,
    num_splits=None,
    longest_first=False,
    mixed=False,
    **batch_kwargs,
):
    query, kc, vc, bt, lens, cu = make_batch(
        q_lens,
        seq_lens,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        **batch_kwargs,
    )
    scale = head_dim**-0.5
    out = torch.full_like(query, float("nan"))
    order = None  # the engine's decode order (VarlenLayout.stage), with longest_first
    if longest_first:
        order = torch.argsort(lens, descending=True, stable=True).to(torch.int32)
    paged_attention(
        query,
        kc,
        vc,
        bt,
        lens,
        cu,
        scale,
        max(q_lens),
        max(seq_lens),
        out=out,
        num_splits=num_splits,
        seq_order=order,
        mixed=mixed,
    )
    ref = paged_attention_ref(query.float(), kc.float(), vc.float(), bt, lens, cu, scale)
    nan_rows = int(out.isnan().any(-1).sum())
    record(name, dtype, rel_err(out, ref), bound_for(dtype), nan_rows=nan_rows)
    return query, kc, vc, bt, lens, cu


def check_attention_suite() -> None:
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randint(1, 4097, (64,), generator=gen).tolist()
    ctx[:4] = [16, 17, 4096, 1]  # on and just past a block boundary
    check_attention("decode B=64 ctx<=4096 GQA4 bs16", [1] * 64, ctx)
    check_attention("decode B=4 long ctx (auto splits)", [1] * 4, [4096, 17, 2048, 1000])
    many = torch.randint(1, 2049, (300,), generator=gen).tolist()
    check_attention("decode B=300 ctx<=2048 longest first", [1] * 300, many, longest_first=True)
    check_attention(
        "mixed apart: a chunk, 300 decodes, longest first", [512, *([1] * 300)], [1024, *many],
        longest_first=True, mixed=True,
    )  # fmt: skip
    mixed_q = [512, 2048, *([1] * 30)]
    mixed_ctx = [1512, 2048, *torch.randint(1, 3000, (30,), generator=gen).tolist()]
    check_attention("mixed: chunk after prefix 1000, prompt, 30 decodes", mixed_q, mixed_ctx)
    check_attention("mixed GQA8 bs32", mixed_q, mixed_ctx, num_heads=64, block_size=32)
    check_attention("mixed forced 3 splits", mixed_q, mixed_ctx, num_splits=3)
    check_attention("mixed fp16", mixed_q, mixed_ctx, dtype=torch.float16)
    small_q, small_ctx = [300, 1, 1, 77], [333, 1024, 16, 77]
    check_attention("mixed fp32 (ieee dots)", small_q, small_ctx, dtype=torch.float32)
    check_attention("mixed fp32 split 4", small_q, small_ctx, dtype=torch.float32, num_splits=4)
    for head_dim in (64, 80, 96, 256):
        check_attention(
            f"mixed MHA head_dim={head_dim} bs16",
            small_q,
            small_ctx,
            num_heads=16,
            num_kv_heads=16,
            head_dim=head_dim,
        )
    check_attention(
        "head_dim=256 GQA4 bs32",
        small_q,
        small_ctx,
        num_heads=16,
        num_kv_heads=4,
        head_dim=256,
        block_size=32,
    )


def check_int64_offsets() -> None:
    """A pool of 140000 x 16 x 8 x 128 = 2.29e9 elements per cache, blocks at its end."""
    num_blocks, block_size, hkv, d = 140_000, 16, 8, 128
    q_lens, ctx = [1, 40, 1], [3000, 40, 700]
    query, kc, vc, bt, lens, cu = make_batch(
        q_lens,
        ctx,
        num_heads=32,
        num_kv_heads=hkv,
        head_dim=d,
        block_size=block_size,
        dtype=torch.bfloat16,
        num_blocks=num_blocks,
        high_blocks=True,
        seed=5,
    )
    assert kc.numel() > 2**31
    out = torch.full_like(query, float("nan"))
    paged_attention(query, kc, vc, bt, lens, cu, d**-0.5, 40, 3000, out=out)
    lo = int(bt.min())  # the reference gathers in fp32: convert only the used tail
    ref = paged_attention_ref(
        query.float(), kc[lo:].float(), vc[lo:].float(), bt - lo, lens, cu, d**-0.5
    )
    record("attention, pool > 2**31 elements", torch.bfloat16, rel_err(out, ref), 1e-2)
    # KV write into the last slots of the same pool.
    n = 1000
    key = torch.randn(n, hkv, d, device=DEV, dtype=torch.bfloat16)
    value = torch.randn(n, hkv, d, device=DEV, dtype=torch.bfloat16)
    slots = torch.arange(num_blocks * block_size - n, num_blocks * block_size, device=DEV)
    slots[::7] = -1
    write_kv_cache(key, value, kc, vc, slots)
    keep = slots >= 0
    got_k = kc.view(-1, hkv, d)[slots[keep]]
    got_v = vc.view(-1, hkv, d)[slots[keep]]
    exact = bool(torch.equal(got_k, key[keep]) and torch.equal(got_v, value[keep]))
    record("kv write, slots past 2**31 elements", torch.bfloat16, 0.0 if exact else 1.0, 0.5)
    del kc, vc
    torch.cuda.empty_cache()


def check_cuda_graph_replay() -> None:
    """Capture a split decode at contexts <= 600 (max_seqlen_k=600), replay at up to 4000."""
    hkv, d, bs = 8, 128, 16
    short, long = [600, 100, 37, 512], [4000, 3333, 1025, 2048]
    _, kc, vc, bt, _, cu = make_batch(
        [1] * 4,
        long,
        num_heads=32,
        num_kv_heads=hkv,
        head_dim=d,
        block_size=bs,
        dtype=torch.bfloat16,
        seed=7,
    )
    query = torch.randn(4, 32, d, device=DEV, dtype=torch.bfloat16)
    lens = torch.tensor(short, dtype=torch.int32, device=DEV)
    out = torch.full_like(query, float("nan"))

    def step():
        paged_attention(query, kc, vc, bt, lens, cu, d**-0.5, 1, max(short), out=out)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        step()
    lens.copy_(torch.tensor(long, dtype=torch.int32))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref = paged_attention_ref(query.float(), kc.float(), vc.float(), bt, lens, cu, d**-0.5)
    record(
        "CUDA graph: captured at ctx<=600, replayed at 4000",
        torch.bfloat16,
        rel_err(out, ref),
        1e-2,
    )


def check_elementwise(tokens: int = 8192, hidden: int = 4096) -> None:
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(tokens, hidden, device=DEV, dtype=dtype)
        w = 1 + 0.1 * torch.randn(hidden, device=DEV, dtype=dtype)
        record(
            f"rms_norm {tokens}x{hidden}",
            dtype,
            rel_err(rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5)),
            bound_for(dtype),
        )
        res = torch.randn_like(x)
        ref_res = res.clone()
        out = fused_add_rms_norm(x, res, w, 1e-5)
        ref = fused_add_rms_norm_ref(x, ref_res, w, 1e-5)
        record(
            f"fused_add_rms_norm {tokens}x{hidden}",
            dtype,
            rel_err(out, ref),
            bound_for(dtype),
            residual_equal=bool(torch.equal(res, ref_res)),
        )
        g = torch.randn(tokens, 2 * 14336, device=DEV, dtype=dtype)
        record(
            f"silu_and_mul {tokens}x14336",
            dtype,
            rel_err(silu_and_mul(g), silu_and_mul_ref(g)),
            bound_for(dtype),
        )
        del g
        # RoPE on q/k views of a fused QKV buffer; llama3-8b heads.
        qkv = torch.randn(tokens, (32 + 16) * 128, device=DEV, dtype=dtype)
        q = qkv[:, : 32 * 128].view(tokens, 32, 128)
        k = qkv[:, 32 * 128 : 40 * 128].view(tokens, 8, 128)
        inv_freq = 1.0 / (500000 ** (torch.arange(0, 128, 2, device=DEV).float() / 128))
        freqs = torch.arange(8192, device=DEV).float()[:, None] * inv_freq[None, :]
        cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
        positions = torch.randint(0, 8192, (tokens,), device=DEV)
        ref_q, ref_k = q.clone(), k.clone()
        rotary_embedding_ref(positions, ref_q, ref_k, cos_sin)
        rotary_embedding(positions, q, k, cos_sin)
        err = max(rel_err(q, ref_q), rel_err(k, ref_k))
        record(
            "rotary q/k views (llama3-8b heads)",
            dtype,
            err,
            bound_for(dtype),
            exact=bool(torch.equal(q, ref_q) and torch.equal(k, ref_k)),
        )
        # KV write from views, skipped slots, into a NaN pool.
        key, value = (
            qkv[:, 32 * 128 : 40 * 128].view(tokens, 8, 128),
            qkv[:, 40 * 128 :].view(tokens, 8, 128),
        )
        kc = torch.full((1024, 16, 8, 128), float("nan"), device=DEV, dtype=dtype)
        vc = torch.full_like(kc, float("nan"))
        slots = torch.randperm(1024 * 16, device=DEV)[:tokens]
        slots[::9] = -1
        rk, rv = kc.clone(), vc.clone()
        write_kv_cache_ref(key, value, rk, rv, slots)
        write_kv_cache(key, value, kc, vc, slots)
        same = torch.equal(kc.nan_to_num(7.0), rk.nan_to_num(7.0)) and torch.equal(
            vc.nan_to_num(7.0), rv.nan_to_num(7.0)
        )
        record("write_kv_cache views, skipped slots", dtype, 0.0 if same else 1.0, 0.5)


def check_fused_rotary_kv() -> None:
    check_rotary_kv(record, DEV)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference stays fp32
    print(f"GPU: {torch.cuda.get_device_name(0)}", flush=True)
    for section in (
        check_attention_suite,
        check_elementwise,
        check_fused_rotary_kv,
        check_cuda_graph_replay,
        check_int64_offsets,
    ):
        try:
            section()
        except Exception as exc:  # keep going: one broken section must not hide the rest
            record(
                f"{section.__name__} raised {type(exc).__name__}: {exc}"[:200],
                torch.float32,
                float("nan"),
                0.0,
            )
    failed = [r for r in RESULTS if not r["ok"]]
    with open(os.path.join(args.out, "check_kernels.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(0), "results": RESULTS}, f, indent=1)
    print(f"\n{len(RESULTS) - len(failed)}/{len(RESULTS)} GPU kernel checks passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
