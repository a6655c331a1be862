"""Bad input gets OpenAI's error body with 400/404 naming the parameter, never a 500, and the
engine keeps serving."""

from __future__ import annotations

import pytest

from .conftest import MAX_MODEL_LEN, MODEL_NAME

CHAT = [{"role": "user", "content": "hi"}]
LONG_PROMPT = list(range(2, 2 + MAX_MODEL_LEN))


def completion(**fields):
    return ("/v1/completions", {"model": MODEL_NAME, "prompt": "def f(x):", **fields})


def chat(**fields):
    return ("/v1/chat/completions", {"model": MODEL_NAME, "messages": CHAT, **fields})


CASES = [
    (completion(model="gpt-17"), 404, "model"),
    (chat(model="nope"), 404, "model"),
    (completion(max_tokens=0), 400, "max_tokens"),
    (completion(max_tokens=-5), 400, "max_tokens"),
    (completion(max_tokens=MAX_MODEL_LEN), 400, "max_tokens"),
    (completion(prompt=LONG_PROMPT, max_tokens=1), 400, "prompt"),
    (completion(prompt=LONG_PROMPT[:-1], max_tokens=2), 400, "max_tokens"),
    (completion(prompt=[5, 99999]), 400, "prompt"),
    (completion(prompt=[]), 400, "prompt"),
    (completion(prompt=""), 400, "prompt"),
    (completion(prompt=3.5), 400, "prompt"),
    (completion(temperature=-1), 400, "temperature"),
    (completion(temperature=3), 400, "temperature"),
    (completion(top_p=0), 400, "top_p"),
    (completion(top_p=1.5), 400, "top_p"),
    (completion(n=0), 400, "n"),
    (completion(n=1000), 400, "n"),
    (completion(presence_penalty=5), 400, "presence_penalty"),
    (completion(frequency_penalty=-3), 400, "frequency_penalty"),
    (completion(logprobs=99), 400, "logprobs"),
    (completion(top_k=-7), 400, "top_k"),
    (completion(min_p=1.5), 400, "min_p"),
    (completion(repetition_penalty=0), 400, "repetition_penalty"),
    (completion(min_tokens=10, max_tokens=2), 400, "min_tokens"),
    (completion(stop=[""]), 400, "stop.0"),
    (completion(seed=2**80), 400, "seed"),
    (completion(logit_bias={"5": 101.0}), 400, "logit_bias"),
    (completion(logit_bias={"x": 1.0}), 400, "logit_bias"),
    (completion(echo=True), 400, "echo"),
    (completion(best_of=3), 400, "best_of"),
    (chat(messages=[]), 400, "messages"),
    (chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages.0.role"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400, None),
    (chat(max_completion_tokens=MAX_MODEL_LEN), 400, "max_completion_tokens"),
    (chat(max_tokens=0), 400, "max_tokens"),
    (chat(top_logprobs=5), 400, "top_logprobs"),
    (chat(logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    (chat(tools=[{"type": "function"}]), 400, "tools"),
    (chat(messages=[{"role": "user", "content": "x" * 2000}]), 400, "messages"),
]


@pytest.mark.parametrize(("request_", "status", "param"), CASES)
def test_bad_parameters_get_openai_errors(client, request_, status, param):
    path, body = request_
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    else:
        assert error["param"] and error["param"].startswith("messages"), error


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_malformed_json_is_a_400(client, path):
    response = client.post(
        path, content=b'{"model": "tiny", "prompt": ', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]["message"]
    response = client.post(path, json=["not", "an", "object"])
    assert response.status_code == 400
    response = client.post(path, json={"prompt": "no model"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "model"


def test_unknown_route_and_method(client):
    assert client.get("/v1/nothing").status_code == 404
    assert "error" in client.get("/v1/nothing").json()
    assert client.get("/v1/completions").status_code == 405


def test_engine_keeps_serving_after_bad_input(client):
    for (path, body), _, _ in CASES[:8]:
        client.post(path, json=body)
    response = client.post(
        "/v1/completions", json={"model": MODEL_NAME, "prompt": "x = ", "max_tokens": 3}
    )
    assert response.status_code == 200
    assert client.get("/health").status_code == 200
