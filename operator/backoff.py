"""Exponential backoff with jitter for retrying failed reconciliations."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before retry number ``failures`` (1-based): base * factor**(failures-1), capped.

    Jitter spreads retries of many objects so that an API server outage does not end in a
    synchronised stampede; it only ever shortens a delay, never below half of it.
    """

    base_s: float = 1.0
    factor: float = 2.0
    cap_s: float = 300.0
    jitter: float = 0.2

    def delay(self, failures: int, rng: Callable[[], float] = random.random) -> float:
        raw = min(self.cap_s, self.base_s * self.factor ** max(0, failures - 1))
        return raw * (1.0 - self.jitter * rng())
