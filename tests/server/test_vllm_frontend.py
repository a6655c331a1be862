"""A server started as a vLLM user would (no API key, CORS for one origin, a short stats
interval): ``vllm bench serve``'s prompt alignment through ``/tokenize`` and ``/detokenize``,
CORS, the start-up lines (KV capacity, "serving on" once bound), the periodic stats line and
its silence when idle, and the request id in log lines."""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, replace

import aiohttp
import httpx
import pytest
from transformers import AutoTokenizer

from .conftest import MAX_MODEL_LEN, MODEL_NAME

ORIGIN = "http://allowed.test"
STATS_INTERVAL = 0.3
STATS_LINE = re.compile(
    r"Avg prompt throughput: ([\d.]+) tokens/s, Avg generation throughput: ([\d.]+) tokens/s, "
    r"Running: (\d+) reqs, Waiting: (\d+) reqs, KV cache usage: [\d.]+%, "
    r"Prefix cache hit rate: [\d.]+%"
)


@pytest.fixture(scope="module")
def frontend(start_module_server, chat_checkpoint):
    return start_module_server(
        chat_checkpoint,
        "--served-model-name", MODEL_NAME,
        "--max-model-len", str(MAX_MODEL_LEN),
        "--kv-cache-memory-bytes", "4M",
        "--allowed-origins", ORIGIN,
        "--log-stats-interval", str(STATS_INTERVAL),
        "--allow-unknown-fields",
    )  # fmt: skip


@dataclass(frozen=True)
class SampleRequest:
    prompt: str
    prompt_len: int


async def align_prompts(base_url: str, model_id: str, requests: list[SampleRequest]):
    """What ``vllm bench serve`` does before it starts (vllm/benchmarks/serve.py,
    ``_align_prompts_to_server_tokenizer``): the same requests, bodies and fields read."""
    async with aiohttp.ClientSession() as session:

        async def tokenize(prompt: str) -> list[int]:
            body = {"model": model_id, "prompt": prompt, "add_special_tokens": False}
            async with session.post(f"{base_url}/tokenize", json=body) as r:
                r.raise_for_status()
                return (await r.json())["tokens"]

        async def detokenize(tokens: list[int]) -> str:
            body = {"model": model_id, "tokens": tokens}
            async with session.post(f"{base_url}/detokenize", json=body) as r:
                r.raise_for_status()
                return (await r.json())["prompt"]

        first = await tokenize(requests[0].prompt)
        if len(first) == requests[0].prompt_len:
            return requests

        async def fix(request: SampleRequest) -> SampleRequest:
            tokens = await tokenize(request.prompt)
            if len(tokens) <= request.prompt_len:
                return request
            return replace(request, prompt=await detokenize(tokens[: request.prompt_len]))

        return await asyncio.gather(*(fix(r) for r in requests))


def test_vllm_bench_serve_aligns_its_prompts(frontend, chat_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(str(chat_checkpoint))
    texts = ["import os\nimport sys\n" * 3, "def main():\n    return 0\n" * 2]
    # As if the benchmark's local tokenizer counted fewer tokens than the server's.
    requests = [SampleRequest(text, 5) for text in texts]
    aligned = asyncio.run(align_prompts(frontend.url, MODEL_NAME, requests))
    for original, fixed in zip(requests, aligned):
        tokens = tokenizer(original.prompt, add_special_tokens=False).input_ids
        assert fixed.prompt == tokenizer.decode(tokens[:5])
        assert original.prompt.startswith(fixed.prompt) and fixed.prompt_len == 5


def test_cors_for_the_allowed_origin_only(frontend):
    preflight = {"Access-Control-Request-Method": "POST"}
    allowed = httpx.options(
        f"{frontend.url}/v1/completions", headers={"Origin": ORIGIN, **preflight}
    )
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(
        f"{frontend.url}/v1/completions", headers={"Origin": "http://evil.test", **preflight}
    )
    assert "access-control-allow-origin" not in other.headers
    listed = httpx.get(f"{frontend.url}/v1/models", headers={"Origin": ORIGIN})
    assert listed.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in listed.headers["access-control-expose-headers"].lower()


def test_start_up_lines(frontend):
    log = frontend.log()
    metrics = httpx.get(f"{frontend.url}/metrics").text
    blocks = int(re.search(r'num_gpu_blocks="(\d+)"', metrics).group(1))
    assert f"KV cache size: {blocks * 16:,} tokens" in log
    concurrency = blocks / (MAX_MODEL_LEN // 16)
    assert (
        f"Maximum concurrency for {MAX_MODEL_LEN:,} tokens per request: {concurrency:.2f}x" in log
    )
    # "serving on" comes once the socket is bound, with the address bound.
    assert log.index("Uvicorn running on") < log.index(f"on {frontend.url} ")


def stats_lines(frontend) -> list[tuple[float, float, int, int]]:
    return [
        (float(m[1]), float(m[2]), int(m[3]), int(m[4]))
        for m in STATS_LINE.finditer(frontend.log())
    ]


def wait_for(condition, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_stats_line_while_busy_and_silence_when_idle(frontend):
    seen = len(stats_lines(frontend))
    response = httpx.post(
        f"{frontend.url}/v1/completions",
        json={"model": MODEL_NAME, "prompt": "hello", "max_tokens": 8, "ignore_eos": True},
        timeout=60,
    )
    assert response.status_code == 200
    # The tokens show in a line; the interval after the last busy one gets one zero line.
    wait_for(lambda: any(gen > 0 for _, gen, _, _ in stats_lines(frontend)[seen:]))
    wait_for(lambda: stats_lines(frontend)[-1] == (0.0, 0.0, 0, 0))
    quiet = len(stats_lines(frontend))
    time.sleep(6 * STATS_INTERVAL)
    assert len(stats_lines(frontend)) == quiet


def test_log_lines_carry_the_request_id(frontend):
    response = httpx.post(
        f"{frontend.url}/v1/completions",
        json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 1, "made_up_field_21": 1},
        headers={"X-Request-Id": "trace-21"},
        timeout=60,
    )
    assert response.status_code == 200 and response.headers["x-request-id"] == "trace-21"
    lines = wait_for(
        lambda: [text for text in frontend.log().splitlines() if "made_up_field_21" in text]
    )
    assert "request_id=trace-21" in lines[0]
