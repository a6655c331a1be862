"""Many concurrent streams complete correctly; disconnecting clients free their KV blocks
at once and leave nothing running."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from metroline.engine import SamplingParams

from .conftest import API_KEY, MODEL_NAME, metric_value

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
PROMPTS = ["def fibonacci(n):", "import sys\n", "for i in range(", "class Tree:"]


async def stream_completion(http: httpx.AsyncClient, prompt: str, max_tokens: int) -> str:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "stream": True}  # fmt: skip
    text, done = [], False
    async with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[len("data: ") :]
            if payload == "[DONE]":
                done = True
                break
            text += [choice["text"] for choice in json.loads(payload)["choices"]]
    assert done
    return "".join(text)


def wait_for_idle(client: httpx.Client, timeout: float) -> tuple[float, float]:
    """Poll /metrics until nothing runs and the KV cache is empty; returns the last values."""
    deadline = time.monotonic() + timeout
    while True:
        text = client.get("/metrics").text
        usage = metric_value(text, "metroline:kv_cache_usage_perc")
        running = metric_value(text, "metroline:num_requests_running")
        waiting = metric_value(text, "metroline:num_requests_waiting")
        if (usage == 0 and running == 0 and waiting == 0) or time.monotonic() > deadline:
            return usage, running + waiting
        time.sleep(0.05)


def test_64_concurrent_streams_complete_correctly(server, offline_llm):
    params = SamplingParams(temperature=0, max_tokens=8)
    expected = [o.outputs[0].text for o in offline_llm.generate(PROMPTS, params, use_tqdm=False)]

    async def run() -> list[str]:
        limits = httpx.Limits(max_connections=80)
        async with httpx.AsyncClient(
            base_url=server.url, headers=HEADERS, timeout=120, limits=limits
        ) as http:
            return await asyncio.gather(
                *(stream_completion(http, PROMPTS[i % 4], 8) for i in range(64))
            )

    results = asyncio.run(run())
    assert results == [expected[i % 4] for i in range(64)]


def aborted_count(client: httpx.Client) -> float:
    text = client.get("/metrics").text
    label = f'finished_reason="abort",model_name="{MODEL_NAME}"'
    return metric_value(text, "metroline:request_success_total", label) if label in text else 0.0


def wait_for_aborts(client: httpx.Client, count: float, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while aborted_count(client) < count:
        assert time.monotonic() < deadline, f"fewer than {count} aborted requests"
        time.sleep(0.05)


def test_aborted_streams_free_their_blocks(server, client):
    aborted_before = aborted_count(client)

    async def open_and_drop(http: httpx.AsyncClient, prompt: str) -> None:
        body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 100,
                "ignore_eos": True, "stream": True}  # fmt: skip
        async with http.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    break  # one chunk, then hang up

    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.url, headers=HEADERS, timeout=60) as http:
            await asyncio.gather(*(open_and_drop(http, PROMPTS[i % 4]) for i in range(20)))

    asyncio.run(run())
    wait_for_aborts(client, aborted_before + 20, timeout=10)
    usage, busy = wait_for_idle(client, timeout=10)
    assert usage == 0 and busy == 0
    assert aborted_count(client) == aborted_before + 20


def test_non_streaming_client_that_gives_up_is_aborted(server, client):
    def generated() -> float:
        return metric_value(client.get("/metrics").text, "metroline:generation_tokens_total")

    before, aborted_before = generated(), aborted_count(client)
    # 16 x 100 tokens: a 2-core CPU computes 270-420 of them before the abort lands, so the
    # client gives up first even on a machine several times faster; only reading times out.
    n, max_tokens = 16, 100
    body = {"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": max_tokens, "n": n,
            "ignore_eos": True}  # fmt: skip
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, headers=HEADERS,
                   timeout=httpx.Timeout(10.0, read=0.1))  # fmt: skip
    wait_for_aborts(client, aborted_before + 1, timeout=10)
    usage, busy = wait_for_idle(client, timeout=10)
    assert usage == 0 and busy == 0
    # The request was cut off well before its n x max_tokens tokens.
    assert generated() - before < n * max_tokens // 2, generated() - before
