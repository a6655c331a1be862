"""Prometheus metrics named ``metroline:<name>``, each labelled ``model_name``, with the
meanings of vLLM's ``vllm:<name>`` metrics (docs/serving.md lists each name and its vLLM
twin), plus the process's own ``process_*`` and ``python_*`` metrics. Each server has its own
registry.

One name differs in meaning from vLLM's: ``metroline:time_per_output_token_seconds`` is one
observation per request (as vLLM's ``request_time_per_output_token_seconds``, which is here
too), where vLLM's deprecated ``time_per_output_token_seconds`` is per token (as
``inter_token_latency_seconds``, here too). Names are never removed: dashboards use them.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from ..client.request_events import FinishedRequest, IterationStats
from ..config import CacheConfig
from ..messages import SchedulerStats

disable_created_metrics()

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                    50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
_ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

_LOOP_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                     30.0)  # fmt: skip


def token_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (vLLM's buckets for token counts)."""
    buckets: list[int] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(buckets)
            buckets.append(mantissa * scale)
        scale *= 10


#: Labels of ``metroline:cache_config_info`` (vLLM's CacheConfig fields that apply here).
_CACHE_INFO_LABELS = (
    "model_name",
    "block_size",
    "num_gpu_blocks",
    "cache_dtype",
    "enable_prefix_caching",
    "gpu_memory_utilization",
    "kv_cache_memory_bytes",
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    """Gauges follow the engine's latest stats; counters and histograms only grow. Request
    histograms get one observation per user request (its ``n`` sequences together), when
    it ends, whatever ended it."""

    def __init__(self, model_name: str, max_model_len: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        self.model_name = model_name
        name = {"model_name": model_name}

        # Each helper makes a metric and returns its series for this model.
        def gauge(metric: str, doc: str) -> Gauge:
            family = Gauge(f"metroline:{metric}", doc, ["model_name"], registry=self.registry)
            return family.labels(**name)

        def counter(metric: str, doc: str) -> Counter:
            family = Counter(f"metroline:{metric}", doc, ["model_name"], registry=self.registry)
            return family.labels(**name)

        def histogram(metric: str, doc: str, buckets) -> Histogram:
            family = Histogram(
                f"metroline:{metric}", doc, ["model_name"], buckets=buckets, registry=self.registry
            )
            return family.labels(**name)

        self.running = gauge("num_requests_running", "Sequences in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Sequences waiting to be scheduled.")
        self.kv_usage = gauge(
            "kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full)."
        )
        self.prefix_queries = counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
        )
        self.prefix_hits = counter(
            "prefix_cache_hits", "Prompt tokens served from the prefix cache."
        )
        self.preemptions = counter("num_preemptions", "Preemptions of running sequences.")
        self.spec_drafts = counter(
            "spec_decode_num_drafts", "Request-steps that verified speculative draft tokens."
        )
        self.spec_draft_tokens = counter(
            "spec_decode_num_draft_tokens", "Speculative draft tokens verified."
        )
        self.spec_accepted = counter(
            "spec_decode_num_accepted_tokens", "Speculative draft tokens accepted."
        )
        self.spec_accepted_per_pos = Counter(
            "metroline:spec_decode_num_accepted_tokens_per_pos",
            "Speculative draft tokens accepted, by position in the draft (0 first).",
            ["model_name", "position"],
            registry=self.registry,
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.request_success = Counter(
            "metroline:request_success",
            "Finished requests by finish reason.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self.ttft = histogram(
            "time_to_first_token_seconds", "Arrival to first token.", _TTFT_BUCKETS
        )
        self.tpot = histogram(
            "time_per_output_token_seconds",
            "Per request: its mean time between token steps after the first (the meaning of "
            "vLLM's request_time_per_output_token_seconds, not of its per-token metric).",
            _TPOT_BUCKETS,
        )
        self.request_tpot = histogram(
            "request_time_per_output_token_seconds",
            "Per request: decode time over its token steps after the first (0 with one).",
            _TPOT_BUCKETS,
        )
        self.itl = histogram(
            "inter_token_latency_seconds",
            "Per token step of a request after its first: time since its previous one.",
            _TPOT_BUCKETS,
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds", "Arrival to last output.", _LATENCY_BUCKETS
        )
        self.queue_time = histogram(
            "request_queue_time_seconds", "Arrival to first scheduling.", _LATENCY_BUCKETS
        )
        self.prefill_time = histogram(
            "request_prefill_time_seconds", "First scheduling to first token.", _LATENCY_BUCKETS
        )
        self.decode_time = histogram(
            "request_decode_time_seconds", "First token to last token.", _LATENCY_BUCKETS
        )
        self.inference_time = histogram(
            "request_inference_time_seconds", "First scheduling to last token.", _LATENCY_BUCKETS
        )
        self.request_prompt_tokens = histogram(
            "request_prompt_tokens", "Prompt tokens per request.", token_buckets(max_model_len)
        )
        self.request_generation_tokens = histogram(
            "request_generation_tokens",
            "Generated tokens per request (all its sequences).",
            token_buckets(max_model_len),
        )
        self.iteration_tokens = histogram(
            "iteration_tokens_total",
            "Tokens per engine step: generated ones, plus the prompts of the requests whose "
            "first token the step produced.",
            _ITERATION_BUCKETS,
        )
        self.loop_lag = histogram(
            "event_loop_lag_seconds",
            "How late the API server's event loop ran a 0.1 s timer (time it was busy).",
            _LOOP_LAG_BUCKETS,
        )
        self.cache_config_info = Gauge(
            "metroline:cache_config_info",
            "The KV cache's settings as labels (num_gpu_blocks: the pool's blocks, on any "
            "device; cache_dtype auto: the model's dtype).",
            list(_CACHE_INFO_LABELS),
            registry=self.registry,
        )
        self._last: SchedulerStats | None = None

    def set_cache_config(self, cache: CacheConfig, num_blocks: int) -> None:
        """``metroline:cache_config_info``: the KV cache's settings as labels, value 1; set
        once the pool is sized."""
        self.cache_config_info.labels(
            model_name=self.model_name,
            block_size=str(cache.block_size),
            num_gpu_blocks=str(num_blocks),
            cache_dtype="auto",
            enable_prefix_caching=str(cache.enable_prefix_caching),
            gpu_memory_utilization=str(cache.gpu_memory_utilization),
            kv_cache_memory_bytes=str(cache.kv_cache_memory_bytes),
        ).set(1)

    def on_step(self, stats: SchedulerStats, iteration: IterationStats) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        last = self._last
        for counter, value, previous in (
            (self.prefix_queries, stats.prefix_cache_queries, last and last.prefix_cache_queries),
            (self.prefix_hits, stats.prefix_cache_hits, last and last.prefix_cache_hits),
            (self.preemptions, stats.num_preemptions, last and last.num_preemptions),
            (self.spec_drafts, stats.spec_num_drafts, last and last.spec_num_drafts),
            (
                self.spec_draft_tokens,
                stats.spec_num_draft_tokens,
                last and last.spec_num_draft_tokens,
            ),
            (
                self.spec_accepted,
                stats.spec_num_accepted_tokens,
                last and last.spec_num_accepted_tokens,
            ),
        ):
            counter.inc(max(0, value - (previous or 0)))
        before = last.spec_accepted_per_position if last is not None else ()
        for position, value in enumerate(stats.spec_accepted_per_position):
            previous = before[position] if position < len(before) else 0
            series = self.spec_accepted_per_pos.labels(self.model_name, str(position))
            series.inc(max(0, value - previous))
        stepped = last is not None and stats.num_steps != last.num_steps
        self._last = stats
        if iteration.num_generation_tokens:
            self.generation_tokens.inc(iteration.num_generation_tokens)
        if stepped or iteration.num_tokens:
            self.iteration_tokens.observe(iteration.num_tokens)
        for latency in iteration.inter_token_latencies:
            self.itl.observe(latency)

    def on_request_finished(self, request: FinishedRequest) -> None:
        self.prompt_tokens.inc(request.num_prompt_tokens)
        self.request_success.labels(self.model_name, request.finish_reason).inc()
        self.e2e.observe(request.e2e_latency)
        self.request_prompt_tokens.observe(request.num_prompt_tokens)
        self.request_generation_tokens.observe(request.num_output_tokens)
        for histogram, value in (
            (self.ttft, request.ttft),
            (self.tpot, request.time_per_output_token),
            (self.request_tpot, request.mean_time_per_output_token),
            (self.queue_time, request.queue_time),
            (self.prefill_time, request.prefill_time),
            (self.decode_time, request.decode_time),
            (self.inference_time, request.inference_time),
        ):
            if value is not None:
                histogram.observe(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
