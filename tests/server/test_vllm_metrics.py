"""/metrics parsed with prometheus_client's own parser: vLLM's per-token and per-request
metrics under ``metroline:``, each with vLLM's meaning (checked against one known request),
the cache info metric, the process metrics, and every older name still there."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import MAX_MODEL_LEN, MODEL_NAME
from .test_metrics import NAMES, settled_metrics

MAX_TOKENS = 9


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, for every sample of ``text``."""
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def series(values, name: str) -> float:
    return values.get((name, (("model_name", MODEL_NAME),)), 0.0)


@pytest.fixture(scope="module")
def one_request(client):
    """Metrics before and after one request of known size, on an otherwise idle server."""
    before = samples(settled_metrics(client))
    response = client.post(
        "/v1/completions",
        json={
            "model": MODEL_NAME,
            "prompt": "import collections\nclass Ring:",
            "max_tokens": MAX_TOKENS,
            "ignore_eos": True,
        },
    )
    assert response.status_code == 200
    after = samples(settled_metrics(client))
    return before, after, response.json()["usage"]


def delta(one_request, name: str) -> float:
    before, after, _ = one_request
    return series(after, name) - series(before, name)


def test_token_histograms_count_the_request(one_request):
    usage = one_request[2]
    assert usage["completion_tokens"] == MAX_TOKENS
    assert delta(one_request, "metroline:request_generation_tokens_sum") == MAX_TOKENS
    assert delta(one_request, "metroline:request_generation_tokens_count") == 1
    assert delta(one_request, "metroline:request_prompt_tokens_sum") == usage["prompt_tokens"]
    # Buckets as vLLM's: 1, 2, 5, 10, 20, 50, ... up to max_model_len (128 here).
    _, after, _ = one_request
    bounds = {
        dict(labels)["le"]
        for (name, labels) in after
        if name == "metroline:request_prompt_tokens_bucket"
    }
    assert MAX_MODEL_LEN == 128
    assert bounds == {"1.0", "2.0", "5.0", "10.0", "20.0", "50.0", "100.0", "+Inf"}


def test_inter_token_latency_is_per_token_and_tpot_per_request(one_request):
    """One ITL per token after the first; one per-request TPOT, the same as the older
    metroline:time_per_output_token_seconds (whose meaning it names)."""
    assert delta(one_request, "metroline:inter_token_latency_seconds_count") == MAX_TOKENS - 1
    assert delta(one_request, "metroline:request_time_per_output_token_seconds_count") == 1
    assert delta(one_request, "metroline:time_per_output_token_seconds_count") == 1
    itl_sum = delta(one_request, "metroline:inter_token_latency_seconds_sum")
    decode = delta(one_request, "metroline:request_decode_time_seconds_sum")
    assert itl_sum == pytest.approx(decode, abs=1e-9)  # the gaps add up to the decode time
    tpot = delta(one_request, "metroline:request_time_per_output_token_seconds_sum")
    assert tpot == pytest.approx(decode / (MAX_TOKENS - 1), abs=1e-9)
    assert tpot == pytest.approx(
        delta(one_request, "metroline:time_per_output_token_seconds_sum"), abs=1e-9
    )


def test_prefill_decode_and_inference_times_add_up(one_request):
    for name in ("prefill", "decode", "inference", "queue"):
        assert delta(one_request, f"metroline:request_{name}_time_seconds_count") == 1, name
    prefill = delta(one_request, "metroline:request_prefill_time_seconds_sum")
    decode = delta(one_request, "metroline:request_decode_time_seconds_sum")
    inference = delta(one_request, "metroline:request_inference_time_seconds_sum")
    assert inference == pytest.approx(prefill + decode, abs=1e-9)
    e2e = delta(one_request, "metroline:e2e_request_latency_seconds_sum")
    assert 0 < inference <= e2e


def test_iteration_tokens_count_each_engine_step(one_request):
    """vLLM's count: a step's generated tokens plus the prompts it finished (one step
    prefills this short prompt and samples the first token, then one step per token)."""
    usage = one_request[2]
    assert delta(one_request, "metroline:iteration_tokens_total_count") == MAX_TOKENS
    assert delta(one_request, "metroline:iteration_tokens_total_sum") == (
        usage["prompt_tokens"] + MAX_TOKENS
    )


def test_cache_config_info_and_process_metrics(one_request):
    _, after, _ = one_request
    (labels,) = [dict(k) for (name, k) in after if name == "metroline:cache_config_info"]
    assert labels["model_name"] == MODEL_NAME and labels["block_size"] == "16"
    assert labels["enable_prefix_caching"] == "True"
    assert int(labels["num_gpu_blocks"]) * 16 >= MAX_MODEL_LEN
    assert after[("metroline:cache_config_info", tuple(sorted(labels.items())))] == 1
    names = {name for name, _ in after}
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "python_info"} <= names
    assert after[("process_resident_memory_bytes", ())] > 0


def test_every_older_name_is_still_there(one_request):
    _, after, _ = one_request
    names = {name for name, _ in after}
    assert set(NAMES) <= names
    assert "metroline:request_success_total" in names
