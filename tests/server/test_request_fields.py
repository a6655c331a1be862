"""Request fields on the shared server (tiny llama with a chat template, max_model_len 128):
unknown fields are a 400 naming them, at any depth; ``truncate_prompt_tokens``,
``stream_options.continuous_usage_stats``, ``include_stop_str_in_output`` and
``prompt_logprobs`` do what vLLM's do; lax bodies (``stream_options`` without ``stream``, a
user message without content) are refused."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from .conftest import MAX_MODEL_LEN, MODEL_NAME

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hello there"}]
BASES = {
    COMPLETIONS: {"model": MODEL_NAME, "prompt": "def wrap(text):", "max_tokens": 4},
    CHAT: {"model": MODEL_NAME, "messages": USER, "max_tokens": 4},
}
#: A token-id prompt longer than max_model_len.
LONG_IDS = [(7 * i) % 500 + 2 for i in range(MAX_MODEL_LEN + 72)]


def post(client: httpx.Client, path: str, **fields) -> httpx.Response:
    return client.post(path, json={**BASES[path], **fields})


def error_of(response: httpx.Response) -> dict:
    assert response.status_code == 400, response.text
    return response.json()["error"]


def events(client: httpx.Client, path: str, **fields) -> list[dict]:
    body = {**BASES[path], "stream": True, **fields}
    with client.stream("POST", path, json=body) as reply:
        assert reply.status_code == 200, reply.read()
        lines = [line for line in reply.iter_lines() if line.startswith("data: {")]
    return [json.loads(line[len("data: ") :]) for line in lines]


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_unknown_fields_are_named_in_a_400(client, path):
    error = error_of(post(client, path, frobnicate=1))
    assert error["param"] == "frobnicate" and error["code"] == "unknown_field"
    assert "'frobnicate'" in error["message"] and "--allow-unknown-fields" in error["message"]
    several = error_of(post(client, path, zeta=1, alpha=2))
    assert "'zeta', 'alpha'" in several["message"]
    nested = post(client, path, stream=True, stream_options={"include_usage": True, "x": 1})
    assert error_of(nested)["param"] == "stream_options.x"


def test_unknown_fields_inside_messages_and_content_parts(client):
    message = {"role": "user", "content": "hi", "tool_call_id": "x"}
    assert error_of(post(client, CHAT, messages=[message]))["param"] == "messages.0.tool_call_id"
    part = {"type": "text", "text": "hi", "cache_control": {}}
    parts = [{"role": "user", "content": [part]}]
    error = error_of(post(client, CHAT, messages=parts))
    assert error["param"] == "messages.0.content.0.cache_control"
    many = error_of(post(client, CHAT, **{f"k{i}": i for i in range(1000)}))
    assert many["message"].count("'k") == 8 and "and more" in many["message"]


def test_lax_bodies_are_refused(client):
    for path in (COMPLETIONS, CHAT):
        error = error_of(post(client, path, stream_options={"include_usage": True}))
        assert error["param"] == "stream_options"
    for content in (None, "absent"):
        message = {"role": "user"} if content == "absent" else {"role": "user", "content": None}
        error = error_of(post(client, CHAT, messages=[message]))
        assert error["param"] == "messages.0.content"
        tokenize = client.post("/tokenize", json={"model": MODEL_NAME, "messages": [message]})
        assert error_of(tokenize)["param"] == "messages.0.content"
    # An assistant's content may be null (as OpenAI allows).
    turns = [*USER, {"role": "assistant", "content": None}, *USER]
    assert post(client, CHAT, messages=turns).status_code == 200
    # response_format: nothing beside its type is dropped unread (the structured types are
    # tested in test_structured_request.py).
    assert post(client, CHAT, response_format={"type": "text"}).status_code == 200
    for fmt in ({}, {"type": "text", "json_schema": {"name": "n", "schema": {}}}):
        param = error_of(post(client, CHAT, response_format=fmt))["param"]
        assert param.startswith("response_format"), param


def test_request_templates_need_the_trust_flag(client):
    error = error_of(post(client, CHAT, chat_template="{{ messages }}"))
    assert error["param"] == "chat_template" and "--trust-request-chat-template" in error["message"]
    too_many = {f"k{i}": i for i in range(33)}
    assert error_of(post(client, CHAT, chat_template_kwargs=too_many))["param"] == (
        "chat_template_kwargs"
    )


def test_truncate_prompt_tokens_keeps_the_last_tokens(client):
    greedy = {"temperature": 0, "max_tokens": 4}
    cut = post(client, COMPLETIONS, prompt=LONG_IDS, truncate_prompt_tokens=20, **greedy).json()
    assert cut["usage"]["prompt_tokens"] == 20
    tail = post(client, COMPLETIONS, prompt=LONG_IDS[-20:], **greedy).json()
    assert cut["choices"][0]["text"] == tail["choices"][0]["text"]
    text = post(client, COMPLETIONS, prompt="word " * 300, truncate_prompt_tokens=9).json()
    assert text["usage"]["prompt_tokens"] == 9
    chat = post(client, CHAT, truncate_prompt_tokens=3).json()
    assert chat["usage"]["prompt_tokens"] == 3
    whole = post(client, COMPLETIONS, prompt=LONG_IDS[:50], truncate_prompt_tokens=-1).json()
    assert whole["usage"]["prompt_tokens"] == 50  # -1: max_model_len
    for bad in (0, -2, MAX_MODEL_LEN + 1):
        error = error_of(post(client, COMPLETIONS, truncate_prompt_tokens=bad))
        assert error["param"] == "truncate_prompt_tokens"


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_continuous_usage_stats_puts_usage_in_every_chunk(client, path):
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = events(client, path, max_tokens=5, ignore_eos=True, stream_options=options)
    usages = [chunk["usage"] for chunk in chunks]
    assert all(usage is not None for usage in usages)
    generated = [usage["completion_tokens"] for usage in usages]
    assert generated == sorted(generated) and generated[-1] == 5
    assert all(u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] for u in usages)
    plain = events(client, path, max_tokens=5, stream_options={"include_usage": True})
    assert [chunk["usage"] is None for chunk in plain].count(False) == 1
    alone = {"stream": True, "stream_options": {"continuous_usage_stats": True}}
    assert error_of(post(client, path, **alone))["param"] == "stream_options.continuous_usage_stats"


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_include_stop_str_in_output(client, path):
    greedy = {"temperature": 0, "max_tokens": 12, "ignore_eos": True}
    full = post(client, path, **greedy).json()["choices"][0]
    text = full["text"] if path == COMPLETIONS else full["message"]["content"]
    stop = text.strip()[2:4]
    assert len(stop) == 2, text
    kept = post(client, path, stop=[stop], include_stop_str_in_output=True, **greedy).json()
    choice = kept["choices"][0]
    kept_text = choice["text"] if path == COMPLETIONS else choice["message"]["content"]
    assert kept_text == text[: text.index(stop) + len(stop)]
    assert choice["finish_reason"] == "stop"


def test_prompt_logprobs_as_vllm_gives_them(client):
    ids = LONG_IDS[:6]
    answer = post(client, COMPLETIONS, prompt=ids, prompt_logprobs=2).json()
    entries = answer["choices"][0]["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    for token_id, entry in zip(ids[1:], entries[1:]):
        assert str(token_id) in entry and 2 <= len(entry) <= 3
        assert {"logprob", "rank", "decoded_token"} <= set(entry[str(token_id)])
        ranks = sorted(e["rank"] for e in entry.values())
        assert ranks[:2] == [1, 2]
    chat = post(client, CHAT, prompt_logprobs=0).json()
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    streamed = post(client, COMPLETIONS, prompt_logprobs=1, stream=True)
    assert error_of(streamed)["param"] == "prompt_logprobs"


def token_ids(client: httpx.Client, text: str) -> list[int]:
    body = {"model": MODEL_NAME, "prompt": text, "add_special_tokens": False}
    return client.post("/tokenize", json=body).json()["tokens"]


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_allowed_token_ids_restrict_the_answer(client, path):
    greedy = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}
    free = post(client, path, **greedy).json()["choices"][0]
    free_text = free["text"] if path == COMPLETIONS else free["message"]["content"]
    assert set(free_text) - {"x", "y"}, free_text  # unrestricted, it says something else
    allowed = token_ids(client, "x") + token_ids(client, "y")
    assert len(allowed) == 2
    choice = post(client, path, allowed_token_ids=allowed, **greedy).json()["choices"][0]
    text = choice["text"] if path == COMPLETIONS else choice["message"]["content"]
    assert len(text) == 8 and set(text) <= {"x", "y"}, text
    for bad in ([], [10**6], [-1], [1.5]):
        assert error_of(post(client, path, allowed_token_ids=bad))["param"].startswith(
            "allowed_token_ids"
        )


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_bad_words_are_never_generated(client, path):
    greedy = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}
    logprobs = {"logprobs": 0} if path == COMPLETIONS else {"logprobs": True}

    def tokens(**fields) -> list[str]:
        choice = post(client, path, **greedy, **logprobs, **fields).json()["choices"][0]
        if path == COMPLETIONS:
            return choice["logprobs"]["tokens"]
        return [entry["token"] for entry in choice["logprobs"]["content"]]

    free = tokens()
    # A word of one token, with and without a leading space, that the free answer says.
    words = [t.strip() for t in free if t.strip()]
    word = next(
        w for w in words if len(token_ids(client, w)) == len(token_ids(client, " " + w)) == 1
    )
    banned = tokens(bad_words=[word])
    assert banned != free and word not in {t.strip() for t in banned}, (word, free, banned)
    for bad in (["  "], ["w" * 257], ["w"] * 129, "word"):
        assert error_of(post(client, path, bad_words=bad))["param"].startswith("bad_words")


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_constraints_that_ban_every_token_are_a_400(client, path):
    x = token_ids(client, "x")
    error = error_of(post(client, path, allowed_token_ids=x, bad_words=["x"]))
    assert error["param"] == "allowed_token_ids" and "bad_words" in error["message"]
    ends = {"allowed_token_ids": x, "stop_token_ids": x, "min_tokens": 2}
    error = error_of(post(client, path, **ends))
    assert error["param"] == "allowed_token_ids" and "min_tokens (2)" in error["message"]


def test_the_engine_request_id_carries_the_clients_x_request_id(client, server):
    ids = []
    for path in (COMPLETIONS, COMPLETIONS, CHAT):
        reply = client.post(path, json=BASES[path], headers={"X-Request-Id": "trace-42"})
        assert reply.status_code == 200 and reply.headers["x-request-id"] == "trace-42"
        ids.append(reply.json()["id"])
    prefixes = ("cmpl-trace-42-", "cmpl-trace-42-", "chatcmpl-trace-42-")
    assert all(i.startswith(p) for i, p in zip(ids, prefixes)), ids
    assert len(set(ids)) == 3  # the same header twice: two engine ids
    own = post(client, COMPLETIONS).json()["id"]
    assert own.startswith("cmpl-") and "trace-42" not in own
    deadline = time.monotonic() + 30
    while not all(f"request finished request_id={i} " in server.log() for i in ids):
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.1)
