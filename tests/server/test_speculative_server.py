"""``metroline serve --speculative-config`` (n-gram, and a draft model: the served checkpoint
drafting for itself): completions equal the plain server's (greedy),
also when a stop string ends the text inside a step's several tokens, streamed or not, with
log-probs; ``/metrics`` counts the drafts; a malformed config is an exit-2 error."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from .conftest import API_KEY, MAX_MODEL_LEN, MODEL_NAME, metric_value

AUTH = {"Authorization": f"Bearer {API_KEY}"}
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
         "prompt_lookup_max": 3}  # fmt: skip
#: Prompts that repeat themselves, so that prompt lookup finds drafts.
PROMPTS = ["one two three one two three one two", "a b a b a b a b a b", "hello world hello"]


@pytest.fixture(scope="module", params=["ngram", "draft_model"])
def spec_server(request, start_module_server, chat_checkpoint):
    config = NGRAM
    if request.param == "draft_model":
        config = {"method": "draft_model", "model": str(chat_checkpoint)}
        config["num_speculative_tokens"] = 3
    return start_module_server(
        chat_checkpoint,
        "--served-model-name", MODEL_NAME,
        "--max-model-len", str(MAX_MODEL_LEN),
        "--kv-cache-memory-bytes", str(2**22),
        "--api-key", API_KEY,
        "--speculative-config", json.dumps(config),
    )  # fmt: skip


def _complete(server, **fields) -> dict:
    body = {"model": MODEL_NAME, "max_tokens": 24, "temperature": 0, **fields}
    reply = httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]


def _streamed_text(server, **fields) -> str:
    body = {"model": MODEL_NAME, "max_tokens": 24, "temperature": 0, "stream": True, **fields}
    text = []
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60
    ) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text.append(json.loads(line[6:])["choices"][0]["text"])
    return "".join(text)


def test_greedy_completions_equal_the_plain_server(spec_server, server):
    for prompt in PROMPTS:
        plain = _complete(server, prompt=prompt, logprobs=2)
        spec = _complete(spec_server, prompt=prompt, logprobs=2)
        assert spec["text"] == plain["text"]
        assert spec["logprobs"]["tokens"] == plain["logprobs"]["tokens"]
        assert spec["logprobs"]["token_logprobs"] == pytest.approx(
            plain["logprobs"]["token_logprobs"], abs=1e-4
        )
        # A stop string from the middle of the answer: cut there in both, streamed or not.
        stop = plain["text"][len(plain["text"]) // 2 :][:3]
        if stop.strip():
            cut = _complete(server, prompt=prompt, stop=[stop])
            assert _complete(spec_server, prompt=prompt, stop=[stop])["text"] == cut["text"]
            assert _streamed_text(spec_server, prompt=prompt, stop=[stop]) == cut["text"]
    metrics = httpx.get(f"{spec_server.url}/metrics").text
    assert metric_value(metrics, "metroline:spec_decode_num_drafts_total") > 0
    assert metric_value(metrics, "metroline:spec_decode_num_draft_tokens_total") > 0
    assert metric_value(metrics, "metroline:spec_decode_num_accepted_tokens_total") > 0


def test_a_malformed_speculative_config_exits_2(chat_checkpoint):
    for bad in ('{"method": "eagle", "num_speculative_tokens": 2}',):  # others: test_spec_decode
        result = subprocess.run(
            [sys.executable, "-P", "-m", "metroline.engine.cli", "serve", str(chat_checkpoint),
             "--speculative-config", bad],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr[-2000:]
        assert "speculative_config" in result.stderr
