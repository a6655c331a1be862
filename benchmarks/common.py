"""Measurement helpers shared by Metroline's benchmarks (see benchmarks/README.md).

Ceilings (copy bandwidth, bf16 matmul rate) are measured on the card at hand in the same run
as the figures they scale; timings are medians of CUDA-event intervals after a warm-up.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import re
import statistics
import subprocess
from collections.abc import Callable
from typing import Any

import torch


def median_ms(fn: Callable[[], Any], *, warmup: int = 5, reps: int = 30, inner: int = 1) -> float:
    """Median GPU time of one ``fn`` call in ms: CUDA events around ``inner`` back-to-back
    calls (several calls let the launch queue run ahead of the GPU, hiding host overhead)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def graph_median_ms(fn: Callable[[], Any], *, replays: int = 30) -> float:
    """Median time of one replay of a CUDA graph that captured ``fn`` (launch gaps removed,
    as in the engine's decode steps). ``fn`` must already be compiled (call it once first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(10):  # untimed: clocks up, caches and TLBs warm
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times)


def copy_bandwidth(num_bytes: int = 1 << 30) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.randn(num_bytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), reps=50)
    return 2 * num_bytes / (ms * 1e-3)


def matmul_flops(n: int = 8192) -> float:
    """bf16 ``n x n x n`` matmul rate in FLOP/s on random data."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b, reps=30)
    return 2 * n**3 / (ms * 1e-3)


def fp8_matmul_flops(n: int = 8192) -> float:
    """e4m3 ``n x n x n`` matmul rate in FLOP/s (``torch._scaled_mm``, row-wise scales, bf16
    out: the engine's fp8 projections)."""
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()
    scale_a = torch.ones(n, 1, device="cuda")
    scale_b = torch.ones(1, n, device="cuda")
    ms = median_ms(
        lambda: torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16),
        reps=30,
    )
    return 2 * n**3 / (ms * 1e-3)


def l2_cache_bytes() -> int:
    props = torch.cuda.get_device_properties(0)
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


def environment() -> dict[str, Any]:
    """Where the figures come from: commit, GPU, driver, library versions, date."""
    import triton

    driver = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
    commit = os.environ.get("METROLINE_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = "unknown"
    props = torch.cuda.get_device_properties(0)
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": commit,
        "gpu": torch.cuda.get_device_name(0),
        "sms": props.multi_processor_count,
        "l2_bytes": l2_cache_bytes(),
        "driver": driver,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; used in result file names."""
    match = re.search(r"\b([A-Z]+\d{2,4}[A-Za-z]?)\b", name)
    return (match.group(1) if match else re.sub(r"\W+", "-", name)).lower()


def resource_report(jit_fn: Any) -> list[dict[str, Any]]:
    """Registers, spills, shared memory and a SASS census of every compiled variant of a Triton
    kernel: wide loads (LDG.E.128), matrix instructions (HGMMA = Hopper wgmma, HMMA = mma.sync)
    and local-memory traffic (LDL/STL, a sign of spilled arrays)."""
    rows = []
    caches = getattr(jit_fn, "device_caches", {})
    for entry in list(caches.values()):
        kernel_cache = entry[0] if isinstance(entry, tuple) else entry
        for kernel in list(kernel_cache.values()):
            row: dict[str, Any] = {"name": getattr(kernel, "name", "?")}
            meta = getattr(kernel, "metadata", None)
            for key in ("num_warps", "num_stages", "shared"):
                row[key] = getattr(meta, key, None)
            row["n_regs"] = getattr(kernel, "n_regs", None)
            row["n_spills"] = getattr(kernel, "n_spills", None)
            try:
                constants = kernel.src.constants  # triton 3.x ASTSource
                row["constants"] = {str(k): str(v) for k, v in constants.items()}
            except AttributeError:
                pass
            try:
                sass = kernel.asm["sass"]
                for op in ("HGMMA", "HMMA", "LDG.E.128", "LDGSTS", "LDL", "STL"):
                    row[f"sass_{op}"] = sass.count(op)
            except Exception as exc:  # nvdisasm missing or a version without "sass"
                row["sass_error"] = repr(exc)[:120]
            rows.append(row)
    return rows
