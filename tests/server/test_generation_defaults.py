"""The server fills every sampling field a request leaves unset from the model's
``generation_config.json``: the demo model's says ``do_sample: false``, so a request without
``temperature`` is answered greedily. ``logit_bias`` reaches the engine."""

from __future__ import annotations

import httpx

from metroline.engine.checkpoint import load_tokenizer
from metroline.engine.demo import demo_model_path
from metroline.engine.server import admission
from metroline.engine.server.protocol_completions import CompletionRequest

PROMPT = "def fibonacci(n):"


def _text(server, **fields) -> str:
    body = {"model": "demo", "prompt": PROMPT, "max_tokens": 24, **fields}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_without_temperature_the_demo_model_answers_greedily(demo_server):
    first, second = _text(demo_server), _text(demo_server)
    assert first == second == _text(demo_server, temperature=0)
    # A request that sets temperature samples (the default only fills unset fields).
    sampled = {_text(demo_server, temperature=1.5, seed=seed) for seed in range(3)}
    assert sampled != {first}


def test_logit_bias_reaches_the_engine(demo_server):
    forced = httpx.post(
        f"{demo_server.url}/v1/completions",
        json={"model": "demo", "prompt": PROMPT, "max_tokens": 4, "logit_bias": {"65": 100}},
        timeout=120,
    ).json()
    tokenizer = load_tokenizer(demo_model_path())
    assert forced["choices"][0]["text"] == tokenizer.decode([65]) * 4
    bad = httpx.post(
        f"{demo_server.url}/v1/completions",
        json={"model": "demo", "prompt": PROMPT, "logit_bias": {"99999": 1}},
        timeout=120,
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "logit_bias", bad.text


def _body(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "x", **fields})


def test_defaults_fill_only_the_unset_fields():
    defaults = {"temperature": 0.0, "top_k": 20, "repetition_penalty": 1.1, "max_tokens": 5}
    params = admission.sampling_params(_body(), 10, None, {}, defaults)
    assert (params.temperature, params.top_k, params.repetition_penalty) == (0.0, 20, 1.1)
    assert params.max_tokens == 10 and params.top_p == 1.0
    params = admission.sampling_params(_body(temperature=0.8, top_k=-1), 10, None, {}, defaults)
    assert (params.temperature, params.top_k, params.repetition_penalty) == (0.8, -1, 1.1)
    assert admission.sampling_params(_body(), 10, None, {}).temperature == 1.0
    assert admission.resolve_max_tokens(None, 3, 100, "max_tokens", "prompt", defaults) == 5
    assert admission.resolve_max_tokens(None, 98, 100, "max_tokens", "prompt", defaults) == 2
    assert admission.resolve_max_tokens(50, 3, 100, "max_tokens", "prompt", defaults) == 50
    assert admission.resolve_max_tokens(None, 3, 100, "max_tokens", "prompt") == 97
