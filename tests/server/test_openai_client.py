"""The official ``openai`` client, unchanged, against a real server: completions, chat,
streaming, ``n > 1``, logprobs, usage; greedy outputs equal the offline ``LLM``'s."""

from __future__ import annotations

import httpx
import openai
import pytest

from metroline.engine import SamplingParams

from .conftest import API_KEY, MODEL_NAME

PROMPTS = ["def fibonacci(n):", "import os\n", "class Point:", "return x"]


@pytest.fixture(scope="module")
def api(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def offline_greedy(offline_llm, prompts, max_tokens: int) -> list[str]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    return [o.outputs[0].text for o in offline_llm.generate(prompts, params, use_tqdm=False)]


def test_models(api):
    models = api.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]


def test_greedy_completions_equal_offline_generate(api, offline_llm):
    expected = offline_greedy(offline_llm, PROMPTS, 12)
    for prompt, text in zip(PROMPTS, expected):
        response = api.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0
        )
        assert response.choices[0].text == text
        assert response.choices[0].finish_reason in ("length", "stop")
        assert response.usage.completion_tokens <= 12
        assert response.usage.total_tokens == (
            response.usage.prompt_tokens + response.usage.completion_tokens
        )
    batch = api.completions.create(model=MODEL_NAME, prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == expected


def test_token_id_prompts(api, offline_llm):
    ids = offline_llm.get_tokenizer()(PROMPTS[0]).input_ids
    response = api.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=8, temperature=0)
    assert response.choices[0].text == offline_greedy(offline_llm, [ids], 8)[0]


def test_streaming_completion_matches_non_streaming(api, offline_llm):
    expected = offline_greedy(offline_llm, PROMPTS[:1], 16)[0]
    stream = api.completions.create(
        model=MODEL_NAME,
        prompt=PROMPTS[0],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.text)
            finish = choice.finish_reason or finish
    assert "".join(pieces) == expected
    assert finish in ("length", "stop")
    assert usage is not None and usage.completion_tokens >= 1


def test_n_greater_than_one(api):
    response = api.completions.create(
        model=MODEL_NAME, prompt=PROMPTS, max_tokens=6, n=3, temperature=1.0, seed=7
    )
    assert sorted(c.index for c in response.choices) == list(range(3 * len(PROMPTS)))
    assert 0 < response.usage.completion_tokens <= 6 * 3 * len(PROMPTS)
    chat = api.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=5, n=2
    )
    assert sorted(c.index for c in chat.choices) == [0, 1]
    stream = api.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        n=2,
        stream=True,
    )
    texts, finishes = {0: "", 1: ""}, {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert set(finishes) == {0, 1}


def test_seeded_sampling_is_reproducible(api):
    def sample() -> list[str]:
        response = api.completions.create(
            model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=8, n=2, temperature=1.0, seed=123
        )
        return [c.text for c in sorted(response.choices, key=lambda c: c.index)]

    assert sample() == sample()


def test_chat_uses_the_chat_template_and_matches_offline(api, offline_llm):
    messages = [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "def fibonacci(n):"},
    ]
    tokenizer = offline_llm.get_tokenizer()
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    expected = offline_greedy(offline_llm, [ids], 10)[0]
    response = api.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_completion_tokens=10, temperature=0
    )
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected
    assert response.usage.prompt_tokens == len(ids)
    stream = api.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=10, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected


def test_logprobs(api):
    chat = api.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for position in content:
        assert len(position.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert position.logprob == pytest.approx(position.top_logprobs[0].logprob)
    legacy = api.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=4, temperature=0, logprobs=2
    )
    logprobs = legacy.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 4
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    assert "".join(logprobs.tokens) == legacy.choices[0].text


def test_stop_strings_and_extra_sampling_fields(api, offline_llm):
    full = offline_greedy(offline_llm, PROMPTS[:1], 16)[0]
    stop = full[4:6]
    response = api.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=[stop]
    )
    assert response.choices[0].text == full[: full.index(stop)]
    assert response.choices[0].finish_reason == "stop"
    streamed = api.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == response.choices[0].text
    extra = api.completions.create(
        model=MODEL_NAME,
        prompt=PROMPTS[0],
        max_tokens=6,
        temperature=0.8,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        extra_body={
            "top_k": 5,
            "min_p": 0.05,
            "repetition_penalty": 1.2,
            "ignore_eos": True,
            "min_tokens": 6,
        },
    )
    assert extra.usage.completion_tokens == 6


def test_api_key_is_required_on_v1_only(server):
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.models.list()
    assert caught.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    for probe in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{server.url}{probe}").status_code == 200
