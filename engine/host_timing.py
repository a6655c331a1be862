"""Where the host's time goes in the step loop, per phase, on every rank.

Off unless ``METROLINE_HOST_TIMING=1`` is set in the environment (worker processes inherit
it): each phase is then timed with ``perf_counter`` around its call, about a microsecond a
phase. ``benchmarks/throughput.py`` reports the totals of every rank. Phases are host time
only: with asynchronous scheduling the device runs meanwhile, so a phase that grows to the
device's step time is what bounds the throughput.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict

ENV = "METROLINE_HOST_TIMING"


def timing_enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


class HostTimer:
    """Totals and counts of named phases. Use ``t = timer.start()`` then
    ``timer.stop("phase", t)``; both are no-ops (``start`` returns 0.0) when disabled."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = timing_enabled() if enabled is None else enabled
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def start(self) -> float:
        return time.perf_counter() if self.enabled else 0.0

    def stop(self, phase: str, started: float) -> float:
        """Add the time since ``started`` to ``phase``; returns now (to chain phases)."""
        if not self.enabled:
            return 0.0
        now = time.perf_counter()
        self.totals[phase] += now - started
        self.counts[phase] += 1
        return now

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
