"""On a server with a 12-block KV pool and one sequence at a time: /ready turns 503 while the
pool is full and back to 200 once it drains; past --max-waiting-requests new requests get
503 with Retry-After at once."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from .conftest import metric_value

MODEL = "small-pool"
#: 12 blocks of 16 tokens for the tiny llama (2 layers, 2 KV heads of 16 dims, fp32).
KV_BYTES = 12 * 16 * 2 * 2 * 2 * 16 * 4


@pytest.fixture(scope="module")
def small_server(start_server, chat_checkpoint):
    return start_server(
        chat_checkpoint,
        "--served-model-name", MODEL,
        "--max-model-len", "128",
        "--kv-cache-memory-bytes", str(KV_BYTES),
        "--max-num-seqs", "1",
        "--ready-kv-threshold", "0.5",
        "--max-waiting-requests", "2",
    )  # fmt: skip


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_ready_flips_with_kv_usage_and_load_is_shed(small_server):
    url = small_server.url
    ready = httpx.get(f"{url}/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    body = {"model": MODEL, "prompt": "def fibonacci(n):", "max_tokens": 110, "ignore_eos": True}
    results: list[int] = []

    def send() -> None:
        results.append(httpx.post(f"{url}/v1/completions", json=body, timeout=120).status_code)

    threads = [threading.Thread(target=send) for _ in range(3)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    # One runs (max_num_seqs=1); two wait: the next is shed at once.
    wait_until(
        lambda: (
            metric_value(
                httpx.get(f"{url}/metrics").text,
                "metroline:num_requests_waiting",
                f'model_name="{MODEL}"',
            )
            >= 2
        ),
        30,
        "two waiting requests",
    )
    shed = httpx.post(f"{url}/v1/completions", json=body, timeout=5)
    assert shed.status_code == 503
    assert shed.headers["retry-after"] == "1"
    assert shed.json()["error"]["code"] == "overloaded"
    # A sequence of 11 + 110 tokens holds 8 of 12 blocks: above the 0.5 threshold.
    unready = wait_until(
        lambda: (r := httpx.get(f"{url}/ready")).status_code == 503 and r, 60, "/ready 503"
    )
    assert "KV-cache usage" in unready.json()["reason"]
    assert httpx.get(f"{url}/health").status_code == 200
    for thread in threads:
        thread.join(120)
    assert results == [200, 200, 200]
    wait_until(lambda: httpx.get(f"{url}/ready").status_code == 200, 10, "/ready 200 again")
