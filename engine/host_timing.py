"""Where the host's time goes in the step loop, per phase, on every rank.

Off unless ``METROLINE_HOST_TIMING=1`` is set in the environment (worker processes inherit
it): each phase is then timed with ``perf_counter`` around its call, about a microsecond a
phase; while a torch profiler records, each phase is also a ``record_function`` range, so
the profile (``benchmarks/throughput.py --profile-steps``) names them.
``benchmarks/throughput.py`` reports the totals of every rank. Phases are host time only:
with asynchronous scheduling the device runs meanwhile, so a phase that grows to the
device's step time is what bounds the throughput.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict
from typing import Any

ENV = "METROLINE_HOST_TIMING"


def timing_enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


class HostTimer:
    """Totals and counts of named phases: ``with timer.phase("core.schedule"): ...``. When
    disabled, ``phase`` returns one shared do-nothing context manager (no clock read)."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = timing_enabled() if enabled is None else enabled
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        #: torch's profiler module (its ``_is_profiler_enabled`` says whether one records)
        #: and ``record_function``; None while timing is off.
        self.profiler: Any = None
        self.ranges: Any = None
        if self.enabled:  # torch only where timing is on (the API server never times)
            from torch.autograd import profiler

            self.profiler, self.ranges = profiler, profiler.record_function

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Time the ``with`` block as phase ``name`` (its time counts even if it raises)."""
        return _Phase(self, name) if self.enabled else _UNTIMED

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] += seconds
        self.counts[name] += 1

    def report(self) -> dict[str, dict[str, float]]:
        """Per phase: total seconds, calls, mean milliseconds per call."""
        return {
            phase: {
                "total_s": round(total, 4),
                "calls": self.counts[phase],
                "mean_ms": round(total / max(1, self.counts[phase]) * 1e3, 4),
            }
            for phase, total in sorted(self.totals.items(), key=lambda item: -item[1])
        }


def merge_reports(*reports: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """One report from several (phases of the same name add up)."""
    combined = HostTimer(enabled=True)
    for report in reports:
        for phase, entry in report.items():
            combined.totals[phase] += entry["total_s"]
            combined.counts[phase] += int(entry["calls"])
    return combined.report()


class _Phase:
    __slots__ = ("name", "range", "started", "timer")

    def __init__(self, timer: HostTimer, name: str) -> None:
        self.timer = timer
        self.name = name
        self.range = None

    def __enter__(self) -> None:
        if self.timer.profiler._is_profiler_enabled:  # a named range only while one records
            self.range = self.timer.ranges(self.name)
            self.range.__enter__()
        self.started = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timer.add(self.name, time.perf_counter() - self.started)
        if self.range is not None:
            self.range.__exit__(*exc)


_UNTIMED = contextlib.nullcontext()
