"""vLLM's extra endpoints on the shared server (API key, chat template): ``/tokenize`` and
``/detokenize`` with vLLM's request and response shapes and bounds, ``GET /v1/models/{id}``
through the ``openai`` client, ``HEAD`` probes, ``X-Request-Id`` on every answer, and the
OpenAPI schema documenting them (``/version`` included)."""

from __future__ import annotations

import re

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from .conftest import API_KEY, MAX_MODEL_LEN, MODEL_NAME

PROMPT = "def fibonacci(n):\n    return n"
CHAT = [{"role": "user", "content": "hi there"}]


@pytest.fixture(scope="module")
def tokenizer(chat_checkpoint):
    return AutoTokenizer.from_pretrained(str(chat_checkpoint))


@pytest.fixture(scope="module")
def schema(server):
    import schemathesis

    return schemathesis.openapi.from_dict(httpx.get(f"{server.url}/openapi.json").json())


def test_tokenize_has_vllms_shape_and_the_servers_tokens(client, tokenizer, schema):
    response = client.post(
        "/tokenize", json={"model": MODEL_NAME, "prompt": PROMPT, "add_special_tokens": False}
    )
    assert response.status_code == 200, response.text
    schema["/tokenize"]["POST"].validate_response(response)
    body = response.json()
    assert body["tokens"] == tokenizer(PROMPT, add_special_tokens=False).input_ids
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == MAX_MODEL_LEN
    assert body["token_strs"] is None
    # Defaults as vLLM's: special tokens added, the model field optional.
    default = client.post("/tokenize", json={"prompt": PROMPT, "return_token_strs": True}).json()
    assert default["tokens"] == tokenizer(PROMPT).input_ids
    assert default["token_strs"] == tokenizer.convert_ids_to_tokens(default["tokens"])


def test_tokenize_renders_a_conversation_as_chat_does(client, tokenizer):
    body = client.post("/tokenize", json={"model": MODEL_NAME, "messages": CHAT}).json()
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert body["tokens"] == tokenizer(text, add_special_tokens=False).input_ids
    bare = client.post("/tokenize", json={"messages": CHAT, "add_generation_prompt": False}).json()
    assert bare["count"] < body["count"]
    usage = client.post(
        "/v1/chat/completions", json={"model": MODEL_NAME, "messages": CHAT, "max_tokens": 1}
    ).json()["usage"]
    assert usage["prompt_tokens"] == body["count"]


def test_detokenize_inverts_tokenize(client, tokenizer, schema):
    tokens = client.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    response = client.post("/detokenize", json={"model": MODEL_NAME, "tokens": tokens})
    assert response.status_code == 200, response.text
    schema["/detokenize"]["POST"].validate_response(response)
    assert response.json() == {"prompt": tokenizer.decode(tokens)}
    assert client.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/detokenize", {"tokens": [5, 512]}, 400, "tokens.1"),  # the vocabulary has 512
        ("/detokenize", {"tokens": [5] * (MAX_MODEL_LEN + 1)}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens.0"),
        ("/tokenize", {"prompt": "x" * 4 * MAX_MODEL_LEN}, 400, "prompt"),
        ("/tokenize", {"prompt": PROMPT, "model": "nope"}, 404, "model"),
        ("/tokenize", {"prompt": PROMPT, "messages": CHAT}, 400, "prompt"),
        ("/tokenize", {"messages": CHAT, "chat_template": "{{ 1 }}"}, 400, "chat_template"),
        ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ],
)
def test_tokenizer_endpoints_are_bounded(client, schema, path, body, status, param):
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param
    schema[path]["POST"].validate_response(response)


def test_tokenizer_endpoints_need_the_key_and_json(server):
    for path in ("/tokenize", "/detokenize"):
        unauthorized = httpx.post(f"{server.url}{path}", json={"prompt": "x", "tokens": []})
        assert unauthorized.status_code == 401
        wrong_type = httpx.post(
            f"{server.url}{path}",
            content=b"prompt=x",
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "text/plain"},
        )
        assert wrong_type.status_code == 415


def test_models_retrieve_with_the_openai_client(server):
    api = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    model = api.models.retrieve(MODEL_NAME)
    assert (model.id, model.object) == (MODEL_NAME, "model")
    with pytest.raises(openai.NotFoundError) as missing:
        api.models.retrieve("no/such-model")
    assert missing.value.body["code"] == "model_not_found"
    assert httpx.get(f"{server.url}/v1/models/{MODEL_NAME}").status_code == 401


def test_probes_answer_head(server):
    for path in ("/health", "/ready"):
        response = httpx.head(f"{server.url}{path}")
        assert response.status_code == 200 and response.content == b""


def test_every_answer_carries_a_request_id(server, client):
    given = {"X-Request-Id": "client-id_1.2:3"}
    assert httpx.get(f"{server.url}/health", headers=given).headers["x-request-id"] == (
        "client-id_1.2:3"
    )
    refused = httpx.get(f"{server.url}/v1/models", headers=given)  # no key: 401 at the gate
    assert refused.status_code == 401 and refused.headers["x-request-id"] == "client-id_1.2:3"
    completion = client.post(
        "/v1/completions",
        json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 1},
        headers={"X-Request-Id": "abc"},
    )
    assert completion.headers["x-request-id"] == "abc"
    for unusable in ("x" * 129, "has space", "é".encode()):
        made = client.get("/health", headers={"X-Request-Id": unusable}).headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", made), made
    first, second = (client.get("/health").headers["x-request-id"] for _ in range(2))
    assert first != second


def test_no_cors_headers_without_allowed_origins(server):
    response = httpx.get(f"{server.url}/health", headers={"Origin": "http://any.test"})
    assert not any(name.startswith("access-control-") for name in response.headers)


def test_the_schema_documents_the_new_routes(server):
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert "post" in paths["/tokenize"] and "post" in paths["/detokenize"]
    assert "get" in paths["/v1/models/{model_id}"]
    assert {"get", "head"} <= set(paths["/health"]) and {"get", "head"} <= set(paths["/ready"])
    assert "version" in paths["/version"]["get"]["description"]
    assert paths["/tokenize"]["post"]["security"] == [{"bearer": []}]
    assert httpx.get(f"{server.url}/version").json()["version"]
