"""A request that fails inside the engine core fails alone, over HTTP: with a fault injected
into the sampling of every prompt whose engine id ends in ``-2`` (the third prompt of a
multi-prompt completion; single prompts' ids end in a hex digit; see engine/faults.py), that
request answers 500 ``engine_error`` (a stream: an error event, then ``[DONE]``), while the
requests running beside it get the same greedy text as the offline engine, and the server
stays alive and empty."""

from __future__ import annotations

import asyncio
import json

import httpx

from metroline.engine import SamplingParams

from .conftest import MAX_MODEL_LEN, MODEL_NAME, metric_value

PROMPTS = ["def fibonacci(n):", "import os\n", "class Point:"]
MAX_TOKENS = 24


async def completion(http: httpx.AsyncClient, prompt, stream: bool = False) -> httpx.Response:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "stream": stream}  # fmt: skip
    return await http.post("/v1/completions", json=body)


async def run_together(url: str) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        return await asyncio.gather(
            completion(http, PROMPTS),  # prompt 2 fails: the whole request fails
            completion(http, PROMPTS, stream=True),
            *(completion(http, p) for p in PROMPTS),  # single prompts: ids end in a hex digit
        )


def test_injected_sampling_fault_fails_one_request_only(
    start_server, chat_checkpoint, offline_llm, monkeypatch
):
    monkeypatch.setenv("METROLINE_INJECT_FAULT", "sampling:-2")
    server = start_server(
        chat_checkpoint,
        "--served-model-name", MODEL_NAME,
        "--max-model-len", str(MAX_MODEL_LEN),
        "--kv-cache-memory-bytes", str(2**22),
    )  # fmt: skip
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    expected = [o.outputs[0].text for o in offline_llm.generate(PROMPTS, greedy, use_tqdm=False)]
    failed, streamed, *singles = asyncio.run(run_together(server.url))

    assert failed.status_code == 500, failed.text
    error = failed.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "engine_error"
    assert "injected fault at sampling" in error["message"]

    assert streamed.status_code == 200
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["error"]["code"] == "engine_error", last

    for response, text in zip(singles, expected):
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == text

    assert httpx.get(f"{server.url}/health").status_code == 200
    again = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS,
              "temperature": 0},
    )  # fmt: skip
    assert again.json()["choices"][0]["text"] == expected[0]
    metrics = httpx.get(f"{server.url}/metrics").text
    label = f'finished_reason="error",model_name="{MODEL_NAME}"'
    assert metric_value(metrics, "metroline:request_success_total", label) == 2
    assert metric_value(metrics, "metroline:num_requests_running") == 0
    assert "engine core is dead" not in server.log()
