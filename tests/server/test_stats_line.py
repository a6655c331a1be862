"""The periodic stats line computed from engine steps (vLLM's log line): rates over the
interval, requests, KV usage, the interval's prefix-cache hit rate, and silence when idle."""

from __future__ import annotations

from metroline.engine.client.request_events import IterationStats
from metroline.engine.messages import SchedulerStats
from metroline.engine.server.stats_logger import StatsLogger


def stats(running=0, waiting=0, usage=0.0, queries=0, hits=0) -> SchedulerStats:
    return SchedulerStats(running, waiting, usage, queries, hits, num_preemptions=0)


def test_rates_requests_and_hit_rate_over_the_interval():
    logger = StatsLogger(10.0, now=0.0)
    logger.record(stats(2, 1, 0.25, 100, 40), IterationStats(4, 96))
    logger.record(stats(2, 1, 0.5, 100, 40), IterationStats(16, 0))
    message, fields = logger.line(now=2.0)
    assert message == (
        "Avg prompt throughput: 48.0 tokens/s, Avg generation throughput: 10.0 tokens/s, "
        "Running: 2 reqs, Waiting: 1 reqs, KV cache usage: 50.0%, Prefix cache hit rate: 40.0%"
    )
    assert fields["generation_tokens_per_s"] == 10.0 and fields["running"] == 2
    # The next interval's hit rate counts only its own queries.
    logger.record(stats(1, 0, 0.1, 150, 90), IterationStats(1, 0))
    assert logger.line(now=4.0)[1]["prefix_cache_hit_rate"] == 1.0


def test_silent_when_idle_after_one_line_of_zeros():
    logger = StatsLogger(10.0, now=0.0)
    assert logger.line(now=1.0) is None  # never busy
    logger.record(stats(1), IterationStats(3, 5))
    logger.record(stats(0), IterationStats(1, 0))
    assert logger.line(now=2.0) is not None
    zeros = logger.line(now=3.0)
    assert zeros is not None and zeros[1]["generation_tokens_per_s"] == 0
    assert logger.line(now=4.0) is None and logger.line(now=5.0) is None
    logger.record(stats(0, waiting=1), IterationStats())  # waiting alone is busy
    assert logger.line(now=6.0) is not None


def test_speculative_decoding_figures_per_interval():
    logger = StatsLogger(10.0, now=0.0)

    def spec(drafts, tokens, accepted) -> SchedulerStats:
        return SchedulerStats(
            1, 0, 0.1, 0, 0, 0, spec_num_drafts=drafts, spec_num_draft_tokens=tokens,
            spec_num_accepted_tokens=accepted,
        )  # fmt: skip

    logger.record(spec(10, 40, 20), IterationStats(30, 0))
    message, fields = logger.line(now=1.0)
    assert message.endswith("Spec decode: mean acceptance length 3.00, draft acceptance rate 50.0%")
    assert fields["spec_acceptance_length"] == 3.0
    logger.record(spec(20, 80, 30), IterationStats(20, 0))  # this interval: 10 drafts, 10 accepted
    assert logger.line(now=2.0)[1]["spec_draft_acceptance_rate"] == 0.25
    logger.record(spec(20, 80, 30), IterationStats(1, 0))  # no step verified drafts
    assert "Spec decode" not in logger.line(now=3.0)[0]
