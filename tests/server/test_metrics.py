"""/metrics: Prometheus text with vLLM's metric meanings under ``metroline:``, each labelled
``model_name``, moving as requests are served."""

from __future__ import annotations

import time

from .conftest import MODEL_NAME, metric_value

LABEL = f'model_name="{MODEL_NAME}"'
NAMES = [
    "metroline:num_requests_running",
    "metroline:num_requests_waiting",
    "metroline:kv_cache_usage_perc",
    "metroline:prefix_cache_queries_total",
    "metroline:prefix_cache_hits_total",
    "metroline:num_preemptions_total",
    "metroline:prompt_tokens_total",
    "metroline:generation_tokens_total",
    "metroline:time_to_first_token_seconds_count",
    "metroline:time_per_output_token_seconds_count",
    "metroline:e2e_request_latency_seconds_count",
    "metroline:request_queue_time_seconds_count",
]


def without_loop_lag(text: str) -> str:
    """The event-loop probe observes every 0.1 s: leave it out when comparing reads."""
    return "\n".join(line for line in text.splitlines() if "event_loop_lag" not in line)


def engine_series(text: str) -> str:
    """The engine's own series: the process and Python collectors' (CPU seconds, memory)
    move on every read, so two reads of an idle server agree only on these."""
    return "\n".join(
        line for line in without_loop_lag(text).splitlines() if line.startswith("metroline:")
    )


def settled_metrics(client) -> str:
    """Metrics once nothing runs and two reads 0.3 s apart agree on the engine's series
    (earlier tests are done)."""
    previous = None
    for _ in range(100):
        text = without_loop_lag(client.get("/metrics").text)
        idle = metric_value(text, "metroline:num_requests_running", LABEL) == 0
        if idle and engine_series(text) == previous:
            return text
        previous = engine_series(text)
        time.sleep(0.3)
    raise AssertionError("metrics never settled")


def test_metrics_names_labels_and_movement(client):
    settled_metrics(client)
    before = client.get("/metrics")
    assert before.status_code == 200
    assert before.headers["content-type"].startswith("text/plain")
    prompt = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)"
    for _ in range(2):  # the second run hits the prefix cache
        response = client.post(
            "/v1/completions",
            json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 5, "ignore_eos": True},
        )
        assert response.status_code == 200
    usage = response.json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 16
    after = client.get("/metrics").text
    values = {name: metric_value(after, name, LABEL) for name in NAMES}
    old = {name: metric_value(before.text, name, LABEL) for name in NAMES}
    assert (
        values["metroline:generation_tokens_total"] - old["metroline:generation_tokens_total"] == 10
    )
    assert values["metroline:prompt_tokens_total"] - old["metroline:prompt_tokens_total"] == (
        2 * usage["prompt_tokens"]
    )
    assert values["metroline:prefix_cache_hits_total"] > old["metroline:prefix_cache_hits_total"]
    for name in NAMES[-4:]:
        assert values[name] - old[name] == 2, name
    assert values["metroline:kv_cache_usage_perc"] == 0
    length = metric_value(
        after, "metroline:request_success_total", f'finished_reason="length",{LABEL}'
    )
    assert length >= 2
    # The event-loop probe has been observing since the server started.
    assert metric_value(after, "metroline:event_loop_lag_seconds_count", LABEL) > 0
