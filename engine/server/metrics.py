"""Prometheus metrics named ``metroline:<name>``, each labelled ``model_name``, with the
meanings of vLLM's ``vllm:<name>`` metrics. Each server has its own registry."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from ..client.request_events import FinishedRequest
from ..messages import SchedulerStats

disable_created_metrics()

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                    50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip

_LOOP_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                     30.0)  # fmt: skip

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    """Gauges follow the engine's latest stats; counters and histograms only grow."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        name = {"model_name": model_name}

        def gauge(metric: str, doc: str) -> Gauge:
            return Gauge(f"metroline:{metric}", doc, ["model_name"], registry=self.registry)

        def counter(metric: str, doc: str, labels=("model_name",)) -> Counter:
            return Counter(f"metroline:{metric}", doc, list(labels), registry=self.registry)

        def histogram(metric: str, doc: str, buckets) -> Histogram:
            return Histogram(
                f"metroline:{metric}", doc, ["model_name"], buckets=buckets, registry=self.registry
            )

        self.running = gauge("num_requests_running", "Sequences in the running batch.").labels(
            **name
        )
        self.waiting = gauge("num_requests_waiting", "Sequences waiting to be scheduled.").labels(
            **name
        )
        self.kv_usage = gauge(
            "kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full)."
        ).labels(**name)
        self.prefix_queries = counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
        ).labels(**name)
        self.prefix_hits = counter(
            "prefix_cache_hits", "Prompt tokens served from the prefix cache."
        ).labels(**name)
        self.preemptions = counter("num_preemptions", "Preemptions of running sequences.").labels(
            **name
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.").labels(**name)
        self.generation_tokens = counter("generation_tokens", "Tokens generated.").labels(**name)
        self.request_success = counter(
            "request_success",
            "Finished requests by finish reason.",
            ("model_name", "finished_reason"),
        )
        self.ttft = histogram(
            "time_to_first_token_seconds", "Arrival to first token.", _TTFT_BUCKETS
        ).labels(**name)
        self.tpot = histogram(
            "time_per_output_token_seconds", "Time per output token after the first.", _TPOT_BUCKETS
        ).labels(**name)
        self.e2e = histogram(
            "e2e_request_latency_seconds", "Arrival to last output.", _LATENCY_BUCKETS
        ).labels(**name)
        self.queue_time = histogram(
            "request_queue_time_seconds", "Arrival to first scheduling.", _LATENCY_BUCKETS
        ).labels(**name)
        self.loop_lag = histogram(
            "event_loop_lag_seconds",
            "How late the API server's event loop ran a 0.1 s timer (time it was busy).",
            _LOOP_LAG_BUCKETS,
        ).labels(**name)
        self._last: SchedulerStats | None = None

    def on_step(self, stats: SchedulerStats, num_generated_tokens: int) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        last = self._last
        for counter, value, previous in (
            (self.prefix_queries, stats.prefix_cache_queries, last and last.prefix_cache_queries),
            (self.prefix_hits, stats.prefix_cache_hits, last and last.prefix_cache_hits),
            (self.preemptions, stats.num_preemptions, last and last.num_preemptions),
        ):
            counter.inc(max(0, value - (previous or 0)))
        self._last = stats
        if num_generated_tokens:
            self.generation_tokens.inc(num_generated_tokens)

    def on_request_finished(self, request: FinishedRequest) -> None:
        self.prompt_tokens.inc(request.num_prompt_tokens)
        self.request_success.labels(self.model_name, request.finish_reason).inc()
        self.e2e.observe(request.e2e_latency)
        for histogram, value in (
            (self.ttft, request.ttft),
            (self.tpot, request.time_per_output_token),
            (self.queue_time, request.queue_time),
        ):
            if value is not None:
                histogram.observe(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
