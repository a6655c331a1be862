"""Readiness with hysteresis: whether this pod should get new connections.

Ready means: the model is loaded, the engine core is alive, the server is not draining, and
the pod is not overloaded. "Overloaded" is entered when KV-cache usage rises above the high
watermark (or the waiting queue above its limit) and left only when usage is at or below
the low watermark and the queue at or below half its limit, so a pod at its limit does not
flap in and out of its Service with every step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..messages import SchedulerStats

logger = logging.getLogger(__name__)


@dataclass
class Readiness:
    kv_high: float
    kv_low: float
    max_waiting: int | None = None
    loaded: bool = False
    draining: bool = False
    dead_reason: str | None = None
    overloaded: bool = False
    overload_reason: str = ""

    def update(self, stats: SchedulerStats) -> None:
        kv, waiting = stats.kv_cache_usage, stats.num_waiting
        if not self.overloaded:
            reason = ""
            if kv > self.kv_high:
                reason = f"KV-cache usage {kv:.2f} is above {self.kv_high:.2f}"
            elif self.max_waiting is not None and waiting > self.max_waiting:
                reason = f"{waiting} requests wait, more than {self.max_waiting}"
            if reason:
                self.overloaded, self.overload_reason = True, reason
                logger.warning("not ready: %s", reason)
        else:
            waiting_ok = self.max_waiting is None or waiting <= self.max_waiting // 2
            if kv <= self.kv_low and waiting_ok:
                self.overloaded, self.overload_reason = False, ""
                logger.info("ready again: KV-cache usage %.2f, %d waiting", kv, waiting)

    def status(self) -> tuple[bool, str]:
        """(ready, reason); the reason names the first thing that keeps it unready."""
        if self.dead_reason is not None:
            return False, f"engine dead: {self.dead_reason}"
        if self.draining:
            return False, "draining: the server is shutting down"
        if not self.loaded:
            return False, "loading: the model is not loaded yet"
        if self.overloaded:
            return False, f"overloaded: {self.overload_reason}"
        return True, "ready"
