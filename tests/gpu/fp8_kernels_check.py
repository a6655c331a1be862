"""Section 1 of ``fp8_check.py``: the fp8 kernels at real sizes against their PyTorch
references (on the CPU smoke test the kernels are the references themselves, so only the
harness is exercised).

- ``per_token_quant_fp8`` / ``static_quant_fp8``: the same e4m3 bytes and scales as the
  references (bf16 and fp32 inputs, outliers, a zero row, static scales that clamp);
- the fp8 KV write: the same bytes as the reference (views of a fused QKV buffer, skipped
  slots, per-head scales small enough to clamp);
- paged attention over an fp8 cache (llama3-8b heads: 32 q, 8 kv, dim 128, block 16; a decode
  batch, one of ``decode_many`` requests (past the few-programs threshold of an H200) and a
  prefill-chunk batch; automatic, 1 and 4 splits, and requests taken longest first
  (``seq_order``)) within relative error ``ATTENTION_BOUND`` of ``paged_attention_ref`` in
  fp32 on the same cache, no NaN row;
- the fused kernels with fp8 output (RMSNorm, fused add + RMSNorm, SiLU-and-mul; the last at
  batch sizes on both sides of its one-pass threshold): the same bytes and scales as the
  unfused Triton kernels followed by ``per_token_quant_fp8`` (on the CPU: the references);
- ``ops.fp8_linear`` within ``LINEAR_BOUND`` of its arithmetic emulated in fp32, on the path
  expected (``torch._scaled_mm`` on CUDA when both dimensions are multiples of 16).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import check_kernels
import torch
from gpu_helpers import Verdicts

from metroline.engine.layers import ops
from metroline.engine.layers.fp8_linear import quantize_per_channel
from metroline.kernels import activation, fp8_gemm, fp8_quant, kv_cache, rmsnorm
from metroline.kernels import paged_attention as attention
from metroline.kernels.fp8_quant import FP8_DTYPE, FP8_MAX

ATTENTION_BOUND = 1e-2  # relative Frobenius error, bf16 query and output (as check_kernels)
LINEAR_BOUND = 1e-2  # relative Frobenius error of the output (bf16 rounding is ~4e-3)


@dataclass(frozen=True)
class KernelSizes:
    """The sizes section 1 runs at (``SMOKE_KERNELS``: the CPU smoke test's)."""

    device: str = "cuda"
    quant_rows: tuple[int, ...] = (1, 7, 256, 4096)
    quant_cols: tuple[int, ...] = (4096, 14336)
    kv_tokens: int = 4096
    decode_batch: int = 64
    decode_many: int = 256
    max_context: int = 4096
    prefill_q: tuple[int, ...] = (512, 2048, *([1] * 30))  # a chunk, a prompt, decodes
    prefill_prefix: int = 1000  # cached tokens before the first chunk
    linear_rows: tuple[int, ...] = (1, 7, 256, 4096)
    #: (name, out_features, in_features): llama3-8b's projections, and one shape that is not
    #: a multiple of 16 (emulated on CUDA too).
    linear_shapes: tuple[tuple[str, int, int], ...] = (
        ("qkv", 6144, 4096),
        ("o", 4096, 4096),
        ("gate_up", 28672, 4096),
        ("down", 4096, 14336),
        ("odd", 100, 200),
    )


SMOKE_KERNELS = KernelSizes(
    device="cpu",
    quant_rows=(1, 7, 33),
    quant_cols=(256, 1000),
    kv_tokens=64,
    decode_batch=4,
    decode_many=6,
    max_context=100,
    prefill_q=(40, 9, 1),
    prefill_prefix=20,
    linear_rows=(1, 7),
    linear_shapes=(("o", 64, 128), ("odd", 100, 200)),
)


def differing_bytes(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.view(torch.uint8) != b.view(torch.uint8)).sum())


def check_quantizers(v: Verdicts, sizes: KernelSizes) -> None:
    cuda = sizes.device == "cuda"
    per_token = fp8_quant.per_token_quant_fp8 if cuda else fp8_quant.per_token_quant_fp8_ref
    static = fp8_quant.static_quant_fp8 if cuda else fp8_quant.static_quant_fp8_ref
    gen = torch.Generator(device=sizes.device).manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        for m in sizes.quant_rows:
            for k in sizes.quant_cols:
                x = torch.randn(m, k, device=sizes.device, generator=gen) * 3
                x[0, :7] *= 100  # outliers set row 0's scale
                if m > 1:
                    x[-1] = 0  # a zero row takes MIN_SCALE
                x = x.to(dtype)
                shape = f"{str(dtype)[6:]} M={m} K={k}"
                out, scale = per_token(x)
                ref, ref_scale = fp8_quant.per_token_quant_fp8_ref(x)
                diff, same = differing_bytes(out, ref), bool(torch.equal(scale, ref_scale))
                v.check(f"per_token_quant_fp8 {shape}", diff == 0 and same, bytes=diff, scales=same)
                # A quarter of the amax's scale: the large values clamp at +-448.
                static_scale = (x.float().abs().amax() / FP8_MAX / 4).reshape(1)
                ref = fp8_quant.static_quant_fp8_ref(x, static_scale)
                diff = differing_bytes(static(x, static_scale), ref)
                v.check(f"static_quant_fp8 {shape}", diff == 0, bytes=diff)
    v.summarize("1 per_token_quant_fp8: exact bytes + scales", "per_token_quant_fp8")
    v.summarize("1 static_quant_fp8: exact bytes", "static_quant_fp8")


def check_fused(v: Verdicts, sizes: KernelSizes) -> None:
    """Fused fp8-output kernels against the unfused path, bit for bit (bf16 rows)."""
    cuda = sizes.device == "cuda"
    gen = torch.Generator(device=sizes.device).manual_seed(1)
    hidden, intermediate = sizes.quant_cols
    for m in (*sizes.quant_rows, activation.SILU_QUANT_ROW_MIN_TOKENS):
        x = (torch.randn(m, hidden, device=sizes.device, generator=gen) * 3).to(torch.bfloat16)
        residual = torch.randn_like(x)
        weight = (1 + 0.1 * torch.randn(hidden, device=sizes.device, generator=gen)).to(x.dtype)
        gated = torch.randn(m, 2 * intermediate, device=sizes.device, generator=gen) * 4
        gated = gated.to(torch.bfloat16)
        if cuda:
            got = {
                "rms_norm_quant_fp8": rmsnorm.rms_norm_quant_fp8(x, weight, 1e-5),
                "fused_add_rms_norm_quant_fp8": rmsnorm.fused_add_rms_norm_quant_fp8(
                    x, residual.clone(), weight, 1e-5
                ),
                "silu_and_mul_quant_fp8": activation.silu_and_mul_quant_fp8(gated),
            }
            summed = residual.clone()
            normed = rmsnorm.fused_add_rms_norm(x, summed, weight, 1e-5)
            want = {
                "rms_norm_quant_fp8": fp8_quant.per_token_quant_fp8(
                    rmsnorm.rms_norm(x, weight, 1e-5)
                ),
                "fused_add_rms_norm_quant_fp8": fp8_quant.per_token_quant_fp8(normed),
                "silu_and_mul_quant_fp8": fp8_quant.per_token_quant_fp8(
                    activation.silu_and_mul(gated)
                ),
            }
        else:
            got = want = {
                "rms_norm_quant_fp8": rmsnorm.rms_norm_quant_fp8_ref(x, weight, 1e-5),
                "fused_add_rms_norm_quant_fp8": rmsnorm.fused_add_rms_norm_quant_fp8_ref(
                    x, residual.clone(), weight, 1e-5
                ),
                "silu_and_mul_quant_fp8": activation.silu_and_mul_quant_fp8_ref(gated),
            }
        for name, (codes, scale) in got.items():
            ref_codes, ref_scale = want[name][0], want[name][1]
            diff, same = differing_bytes(codes, ref_codes), bool(torch.equal(scale, ref_scale))
            v.check(f"{name} M={m}", diff == 0 and same, bytes=diff, scales=same)
    for name in ("rms_norm_quant_fp8", "fused_add_rms_norm_quant_fp8", "silu_and_mul_quant_fp8"):
        v.summarize(f"1 {name}: the unfused path's bytes + scales", name)


def check_kv_write(v: Verdicts, sizes: KernelSizes) -> None:
    n, hkv, d, bs, dev = sizes.kv_tokens, 8, 128, 16, sizes.device
    write = kv_cache.write_kv_cache if dev == "cuda" else kv_cache.write_kv_cache_ref
    gen = torch.Generator(device=dev).manual_seed(1)
    qkv = (torch.randn(n, 48 * d, device=dev, generator=gen) * 4).to(torch.bfloat16)
    key, value = qkv[:, 32 * d : 40 * d].view(n, hkv, d), qkv[:, 40 * d :].view(n, hkv, d)
    # Per-head scales; the small ones push |x| / scale past 448, where the codes clamp.
    k_scale = torch.rand(hkv, device=dev, generator=gen) * 0.05 + 0.01
    v_scale = torch.rand(hkv, device=dev, generator=gen) * 0.05 + 0.01
    blocks = 2 * n // bs + 1
    pool = torch.full((blocks, bs, hkv, d), math.nan, device=dev).to(FP8_DTYPE)
    ref_k, ref_v, out_k, out_v = pool, pool.clone(), pool.clone(), pool.clone()
    slots = torch.randperm(blocks * bs, device=dev, generator=gen)[:n]
    slots[::9] = -1
    kv_cache.write_kv_cache_ref(key, value, ref_k, ref_v, slots, k_scale=k_scale, v_scale=v_scale)
    write(key, value, out_k, out_v, slots, k_scale=k_scale, v_scale=v_scale)
    diff = differing_bytes(out_k, ref_k) + differing_bytes(out_v, ref_v)
    v.check("write_kv_cache fp8 (QKV views, skipped slots, clamping)", diff == 0, bytes=diff)
    v.summarize("1 write_kv_cache fp8: exact bytes", "write_kv_cache")


def fp8_caches(key_cache: torch.Tensor, value_cache: torch.Tensor) -> list[torch.Tensor]:
    """``[k_fp8, k_scale, v_fp8, v_scale]``: a pool quantized with per-KV-head scales that map
    each head's amax to 448 (the NaN outside every context stays NaN)."""
    out = []
    for cache in (key_cache, value_cache):
        amax = cache.float().nan_to_num(0.0).abs().amax(dim=(0, 1, 3))
        scale = (amax / FP8_MAX).clamp_min(1e-6)
        out += [(cache.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale]
    return out


def check_attention(v: Verdicts, sizes: KernelSizes) -> None:
    check_kernels.DEV = sizes.device  # make_batch builds its batch there
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randint(1, sizes.max_context + 1, (sizes.decode_batch,), generator=gen).tolist()
    ctx[:4] = [16, 17, sizes.max_context, 1]  # on and just past a block boundary
    q = list(sizes.prefill_q)
    rest = torch.randint(1, sizes.max_context, (len(q) - 2,), generator=gen).tolist()
    many = torch.randint(1, sizes.max_context // 2, (sizes.decode_many,), generator=gen).tolist()
    batches = {
        "decode": ([1] * len(ctx), ctx),
        "decode-many": ([1] * len(many), many),
        "prefill-chunk": (q, [sizes.prefill_prefix + q[0], q[1], *rest]),
    }
    for batch, (q_lens, seq_lens) in batches.items():
        query, kc, vc, bt, lens, cu = check_kernels.make_batch(
            q_lens,
            seq_lens,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            block_size=16,
            dtype=torch.bfloat16,
        )
        kc, k_scale, vc, v_scale = fp8_caches(kc, vc)
        scales = {"k_scale": k_scale, "v_scale": v_scale}
        args = (query, kc, vc, bt, lens, cu, 128**-0.5)
        ref = attention.paged_attention_ref(query.float(), *args[1:], **scales)
        for splits in (None, 1, 4, "ordered"):
            out = torch.full_like(query, math.nan)
            if query.is_cuda:
                launch = {"num_splits": splits}
                if splits == "ordered":  # the rules' launch, the requests longest first
                    order = torch.argsort(lens, descending=True, stable=True).to(torch.int32)
                    launch = {"seq_order": order}
                attention.paged_attention(
                    *args, max(q_lens), max(seq_lens), out=out, **launch, **scales
                )
            else:
                attention.paged_attention_ref(*args, out=out, **scales)
            err = check_kernels.rel_err(out, ref)
            nan_rows = int(out.isnan().any(-1).sum())
            v.check(
                f"paged_attention fp8 cache {batch} splits={splits or 'auto'}",
                math.isfinite(err) and err < ATTENTION_BOUND and nan_rows == 0,
                max_abs_err=float((out.float() - ref).abs().max()),
                rel_err=err,
                nan_rows=nan_rows,
            )
    v.summarize("1 paged_attention fp8 cache vs ref (max abs)", "paged_attention", "max_abs_err")
    v.summarize("1 paged_attention fp8 cache vs ref (rel)", "paged_attention", "rel_err")


@contextlib.contextmanager
def counting_scaled_mm() -> Iterator[list[int]]:
    """Count calls of ``torch._scaled_mm``, the path ``ops.fp8_linear`` takes on CUDA when both
    dimensions are multiples of 16 (CUDA-graph replays call nothing, so count nothing)."""
    calls = [0]
    original = torch._scaled_mm

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls[0] += 1
        return original(*args, **kwargs)

    torch._scaled_mm = counted
    try:
        yield calls
    finally:
        torch._scaled_mm = original


def emulated_fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: Any
) -> torch.Tensor:
    """``ops.fp8_linear``'s arithmetic in fp32: reference quantizer, dequantized operands."""
    if input_scale is None:
        x_fp8, x_scale = fp8_quant.per_token_quant_fp8_ref(x)
    else:
        x_fp8, x_scale = fp8_quant.static_quant_fp8_ref(x, input_scale), input_scale
    return (x_fp8.float() * x_scale) @ (weight.float() * weight_scale[:, None]).t()


def check_fp8_linear(v: Verdicts, sizes: KernelSizes) -> None:
    dev = sizes.device
    gen = torch.Generator(device=dev).manual_seed(2)
    for name, n, k in sizes.linear_shapes:
        w = (torch.randn(n, k, device=dev, generator=gen) * 0.02).to(torch.bfloat16)
        weight, weight_scale = quantize_per_channel(w, w.abs().amax(dim=1).float())
        del w
        expected = "scaled_mm" if dev == "cuda" and n % 16 == 0 and k % 16 == 0 else "emulated"
        dtypes = (torch.bfloat16, torch.float32) if name == "o" else (torch.bfloat16,)
        for m, dtype, static in itertools.product(sizes.linear_rows, dtypes, (False, True)):
            x = torch.randn(m, k, device=dev, generator=gen).to(dtype)
            input_scale = (x.float().abs().amax() / FP8_MAX).reshape(1) if static else None
            case = f"fp8_linear {name} {n}x{k} M={m} {str(dtype)[6:]} "
            case += "static" if static else "per-token"
            try:  # one shape the matmul refuses must not hide the others
                with counting_scaled_mm() as calls:
                    y = ops.fp8_linear(x, weight, weight_scale, input_scale)
            except Exception as error:
                v.check(case, False, rel_err=math.nan, path="raised", error=repr(error)[:200])
                continue
            ref = emulated_fp8_linear(x, weight, weight_scale, input_scale)
            err = check_kernels.rel_err(y, ref)
            path = "scaled_mm" if calls[0] else "emulated"
            ok = err < LINEAR_BOUND and path == expected and y.dtype == dtype
            v.check(case, ok, rel_err=err, path=path)
    v.summarize("1 ops.fp8_linear vs fp32 emulation", "fp8_linear", "rel_err")
    paths = [d["path"] for d in v.details if d["check"].startswith("fp8_linear")]
    v.table["1 ops.fp8_linear paths"] = {p: paths.count(p) for p in sorted(set(paths))}


def _median_us(fn: Any, *args: Any, reps: int = 20, **kwargs: Any) -> float:
    """Median device time of ``fn(*args, **kwargs)`` in microseconds, after one warm-up."""
    fn(*args, **kwargs)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args, **kwargs)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def check_small_m_gemm(v: Verdicts, sizes: KernelSizes) -> None:
    """kernels.fp8_gemm (not yet routed by ops.fp8_linear) against its reference, and its
    time against ``torch._scaled_mm`` at decode-sized M (CUDA only)."""
    if sizes.device != "cuda":
        return
    gen = torch.Generator(device="cuda").manual_seed(3)
    for name, n, k in sizes.linear_shapes:
        if n % 16 or k % 16:
            continue
        w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
        weight, weight_scale = quantize_per_channel(w, w.abs().amax(dim=1).float())
        for m in (1, 7, fp8_gemm.SMALL_M_MAX):
            x = torch.randn(m, k, device="cuda", generator=gen)
            x_fp8, x_scale = fp8_quant.per_token_quant_fp8(x)
            operands = (x_fp8, x_scale, weight, weight_scale)
            y = fp8_gemm.fp8_gemm_small_m(*operands, torch.bfloat16)
            ref = fp8_gemm.fp8_gemm_small_m_ref(*operands, torch.float32)
            err = check_kernels.rel_err(y, ref)
            ours = _median_us(fp8_gemm.fp8_gemm_small_m, *operands, torch.bfloat16)
            library = _median_us(
                torch._scaled_mm, x_fp8, weight.t(), scale_a=x_scale,
                scale_b=weight_scale.view(1, -1), out_dtype=torch.bfloat16,
            )  # fmt: skip
            v.check(f"fp8_gemm_small_m {name} {n}x{k} M={m}", err < LINEAR_BOUND, rel_err=err,
                    triton_us=ours, scaled_mm_us=library)  # fmt: skip
            v.table[f"1 fp8_gemm_small_m {name} M={m}: triton / scaled_mm us"] = (
                f"{ours:.1f} / {library:.1f}"
            )
    v.summarize("1 fp8_gemm_small_m vs ref", "fp8_gemm_small_m", "rel_err")


def check_fp8_kernels(v: Verdicts, sizes: KernelSizes) -> None:
    """Every part of section 1, each on its own (one that raises leaves the others)."""
    for part in (
        check_quantizers, check_fused, check_kv_write, check_attention, check_fp8_linear,
        check_small_m_gemm,
    ):
        v.section(f"1 {part.__name__}", part, v, sizes)
