"""The periodic stats line (as vLLM's): prompt and generation throughput since the last line,
running and waiting requests, KV-cache usage and the prefix-cache hit rate, every
``--log-stats-interval`` seconds while the server is busy; with speculative decoding, the
interval's mean acceptance length and draft acceptance rate too.

Silent while idle: a line is written when this interval or the one before it saw tokens, or
when requests run or wait; so the last busy interval is followed by one line of zeros, then
nothing until the next request.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..client.request_events import IterationStats
from ..messages import SchedulerStats

logger = logging.getLogger("metroline.stats")


class StatsLogger:
    """Counts tokens from :meth:`record` (called per engine step) and turns them into one line
    per interval (:meth:`line`). Touched on the event loop only."""

    def __init__(self, interval: float, now: float | None = None) -> None:
        self.interval = interval
        self._since = time.monotonic() if now is None else now
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._was_busy = False
        self._stats: SchedulerStats | None = None
        #: Prefix-cache counters (queries, hits) at the last line.
        self._prefix_at_line = (0, 0)
        #: Speculative-decoding counters (drafts, draft tokens, accepted) at the last line.
        self._spec_at_line = (0, 0, 0)

    def record(self, stats: SchedulerStats, iteration: IterationStats) -> None:
        self._stats = stats
        self._prompt_tokens += iteration.num_prompt_tokens
        self._generation_tokens += iteration.num_generation_tokens

    def line(self, now: float) -> tuple[str, dict[str, float]] | None:
        """The line for the interval ending ``now`` (message and fields), or None when idle;
        starts the next interval either way."""
        elapsed = max(now - self._since, 1e-9)
        prompt_rate = self._prompt_tokens / elapsed
        generation_rate = self._generation_tokens / elapsed
        stats = self._stats
        running = stats.num_running if stats else 0
        waiting = stats.num_waiting if stats else 0
        queries, hits = (
            (stats.prefix_cache_queries, stats.prefix_cache_hits) if stats else self._prefix_at_line
        )
        new_queries = queries - self._prefix_at_line[0]
        hit_rate = (hits - self._prefix_at_line[1]) / new_queries if new_queries > 0 else 0.0
        busy = bool(self._prompt_tokens or self._generation_tokens or running or waiting)
        report = busy or self._was_busy
        self._since, self._prompt_tokens, self._generation_tokens = now, 0, 0
        self._was_busy, self._prefix_at_line = busy, (queries, hits)
        if not report:
            return None
        usage = stats.kv_cache_usage if stats else 0.0
        message = (
            f"Avg prompt throughput: {prompt_rate:.1f} tokens/s, Avg generation throughput: "
            f"{generation_rate:.1f} tokens/s, Running: {running} reqs, Waiting: {waiting} reqs, "
            f"KV cache usage: {usage * 100:.1f}%, Prefix cache hit rate: {hit_rate * 100:.1f}%"
        )
        fields = {
            "prompt_tokens_per_s": round(prompt_rate, 1),
            "generation_tokens_per_s": round(generation_rate, 1),
            "running": running,
            "waiting": waiting,
            "kv_cache_usage": round(usage, 4),
            "prefix_cache_hit_rate": round(hit_rate, 4),
        }
        spec = self._spec_interval(stats)
        if spec is not None:
            length, rate = spec
            message += (
                f", Spec decode: mean acceptance length {length:.2f}, "
                f"draft acceptance rate {rate * 100:.1f}%"
            )
            fields |= {"spec_acceptance_length": round(length, 3),
                       "spec_draft_acceptance_rate": round(rate, 4)}  # fmt: skip
        return message, fields

    def _spec_interval(self, stats: SchedulerStats | None) -> tuple[float, float] | None:
        """(tokens a verifying step emitted on average, accepted / drafted) over the interval,
        or None when no step verified drafts in it."""
        if stats is None:
            return None
        now = (stats.spec_num_drafts, stats.spec_num_draft_tokens, stats.spec_num_accepted_tokens)
        drafts, tokens, accepted = (a - b for a, b in zip(now, self._spec_at_line))
        self._spec_at_line = now
        if drafts <= 0 or tokens <= 0:
            return None
        return 1 + accepted / drafts, accepted / tokens

    async def run(self) -> None:
        """Write a line every ``interval`` seconds (while busy) until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            line = self.line(time.monotonic())
            if line is not None:
                logger.info(line[0], extra={"fields": line[1]})
