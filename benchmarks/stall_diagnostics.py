"""Why a run's GPU waits: its idle time, a profile of a window of steps, the host's pauses.

``throughput.py --gpu-timeline`` records the measured run's kernels (CUDA activity only, so
the host's own cost barely changes) and reports the span from the first kernel's start to the
last one's end, the time some kernel was running (the union of their intervals), the idle
rest, and the idle gaps grouped by the kernels on either side of them: a gap between the last
kernel of one step and the first of the next is the host not keeping up; a gap inside a
step's kernels is a synchronisation or a slow launch there. ``--profile-steps START:COUNT``
profiles host and device over a window of engine steps (:func:`step_window_profile`), and
every run records Python's garbage collections (:func:`gc_pauses`), each a pause of the
host's step loop.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger("stall_diagnostics")

#: Gaps shorter than this are launch latency inside a queue that never ran dry.
MIN_GAP_NS = 20_000
#: The span is cut into this many equal parts for the idle time of each.
TIME_BINS = 20
#: Kernel names are cut to this many characters in the report (templated names are long).
NAME_CHARS = 60


@contextlib.contextmanager
def gpu_timeline(enabled: bool) -> Iterator[dict[str, Any]]:
    """Around a run: with ``enabled``, the kernels' :func:`timeline_summary` lands in the
    yielded dict's ``summary`` (and the log); otherwise nothing is recorded."""
    found: dict[str, Any] = {}
    if not enabled:
        yield found
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        yield found
    found["summary"] = timeline_summary(kernel_intervals(prof))
    logger.info("%s", format_summary(found["summary"]))


def parse_window(text: str) -> tuple[int, int]:
    """``START:COUNT`` (steps counted from 0) as two integers, COUNT at least 1."""
    start, _, count = text.partition(":")
    window = (int(start), int(count or 1))
    if window[0] < 0 or window[1] < 1:
        raise ValueError(f"a step window is START:COUNT with START >= 0, COUNT >= 1: {text}")
    return window


@contextlib.contextmanager
def step_window_profile(core: Any, window: tuple[int, int] | None, out: Path) -> Iterator[None]:
    """Host (CPU ops and CUDA runtime calls) and device activity of the engine core's steps
    ``window`` = (start, count) while the block runs; the tables, by self host time and by
    device time, go to ``out``, the trace beside it (``.trace.json.gz``). The core's
    ``step`` is wrapped for the block only."""
    if window is None:
        yield
        return
    from torch.profiler import ProfilerActivity, profile, schedule

    start, count = window

    def write(prof: Any) -> None:
        averages = prof.key_averages()
        tables = [
            f"steps {start}..{start + count - 1}, by self host time:",
            averages.table(sort_by="self_cpu_time_total", row_limit=40),
            "by device time:",
            averages.table(sort_by="cuda_time_total", row_limit=25),
        ]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(tables))
        trace = out.with_suffix(".trace.json")
        prof.export_chrome_trace(str(trace))
        with trace.open("rb") as raw, gzip.open(f"{trace}.gz", "wb") as packed:
            shutil.copyfileobj(raw, packed)
        trace.unlink()
        logger.info("step window profile written to %s", out)

    prof = profile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
        schedule=schedule(skip_first=max(0, start - 1), wait=0, warmup=min(1, start),
                          active=count, repeat=1),
        on_trace_ready=write,
    )  # fmt: skip
    step = core.step
    taken = [0]

    def profiled_step() -> Any:
        result = step()
        prof.step()
        taken[0] += 1
        return result

    core.step = profiled_step
    prof.start()
    try:
        yield
    finally:
        del core.step  # the method again, whatever the profiler does next
        if taken[0] < start + count:
            logger.warning(
                "the run took %d steps: steps %d..%d were not all profiled",
                taken[0], start, start + count - 1,
            )  # fmt: skip
        prof.stop()


def kernel_intervals(prof: Any) -> list[tuple[int, int, str]]:
    """(start ns, end ns, name) of every GPU kernel a finished profile recorded, by start."""
    import torch

    cuda = torch.autograd.DeviceType.CUDA
    intervals = [
        (event.start_ns(), event.end_ns(), event.name())
        for event in prof.profiler.kineto_results.events()
        if event.device_type() == cuda and not event.name().startswith("Memcpy")
        and not event.name().startswith("Memset")
    ]  # fmt: skip
    return sorted(intervals)


def timeline_summary(
    intervals: Iterable[tuple[int, int, str]], top: int = 12, min_gap_ns: int = MIN_GAP_NS
) -> dict[str, Any]:
    """Span, busy and idle seconds of ``intervals`` (sorted by start; they may overlap), and
    the ``top`` neighbour pairs of kernels around gaps of at least ``min_gap_ns``, by the
    idle time they hold."""
    first_start = last_end = None
    busy = 0
    gaps: dict[tuple[str, str], list[int]] = {}
    idle_at: list[tuple[int, int]] = []  # (start, end) of every gap
    previous_name = ""
    num_kernels = 0
    for start, end, name in intervals:
        num_kernels += 1
        if first_start is None:
            first_start, last_end = start, end
            busy, previous_name = end - start, name
            continue
        if start > last_end:
            gap = start - last_end
            idle_at.append((last_end, start))
            if gap >= min_gap_ns:
                pair = (previous_name[:NAME_CHARS], name[:NAME_CHARS])
                entry = gaps.setdefault(pair, [0, 0])
                entry[0] += 1
                entry[1] += gap
            busy += end - start
        elif end > last_end:
            busy += end - last_end
        if end >= last_end:
            last_end, previous_name = end, name
    if first_start is None:
        return {"kernels": 0, "span_s": 0.0, "busy_s": 0.0, "idle_s": 0.0, "gaps": []}
    span = last_end - first_start
    ranked = sorted(gaps.items(), key=lambda item: -item[1][1])[:top]
    bins = [0.0] * TIME_BINS
    width = max(1, span) / TIME_BINS
    for gap_start, gap_end in idle_at:  # each gap split over the bins it covers
        first = min(TIME_BINS - 1, int((gap_start - first_start) / width))
        for index in range(first, TIME_BINS):
            low = first_start + index * width
            overlap = min(gap_end, low + width) - max(gap_start, low)
            if overlap <= 0:
                break
            bins[index] += overlap
    return {
        "kernels": num_kernels,
        "span_s": span / 1e9,
        "busy_s": busy / 1e9,
        "idle_s": (span - busy) / 1e9,
        "busy_fraction": busy / span if span else 1.0,
        "idle_in_gaps_s": sum(total for _, total in gaps.values()) / 1e9,
        "idle_fraction_by_time": [round(idle / width, 4) for idle in bins],
        "gaps": [
            {"before": before, "after": after, "count": count, "total_s": total / 1e9}
            for (before, after), (count, total) in ranked
        ],
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for the log: the totals, then the largest gap pairs."""
    lines = [
        f"GPU timeline: {summary['kernels']} kernels over {summary['span_s']:.2f} s, busy "
        f"{summary['busy_s']:.2f} s ({100 * summary.get('busy_fraction', 1.0):.1f}%), idle "
        f"{summary['idle_s']:.2f} s ({summary.get('idle_in_gaps_s', 0.0):.2f} s in gaps "
        f">= {MIN_GAP_NS // 1000} us)"
    ]
    by_time = summary.get("idle_fraction_by_time")
    if by_time:
        lines.append(
            "  idle % by twentieth of the run: " + " ".join(f"{100 * f:.0f}" for f in by_time)
        )
    for gap in summary["gaps"]:
        lines.append(
            f"  {gap['total_s'] * 1e3:9.1f} ms in {gap['count']:5d} gaps: "
            f"{gap['before']} -> {gap['after']}"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def gc_pauses() -> Iterator[dict[str, Any]]:
    """Python's cyclic garbage collections while the block runs: count and seconds per
    generation and the longest pause (the host loop stalls for each)."""
    import gc
    import time

    found: dict[str, Any] = {"count": [0, 0, 0], "seconds": [0.0, 0.0, 0.0], "max_s": 0.0}
    started: list[float] = []

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            pause = time.perf_counter() - started.pop()
            generation = info["generation"]
            found["count"][generation] += 1
            found["seconds"][generation] += pause
            found["max_s"] = max(found["max_s"], pause)

    gc.callbacks.append(callback)
    try:
        yield found
    finally:
        gc.callbacks.remove(callback)
        logger.info(
            "garbage collections by generation: %s, %s s; longest %.1f ms",
            found["count"], [round(s, 3) for s in found["seconds"]], found["max_s"] * 1e3,
        )  # fmt: skip
