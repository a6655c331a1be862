"""Chat templates: ``--chat-template`` (a file or the text), ``chat_template_kwargs``,
``add_generation_prompt``, ``continue_final_message``, ``echo``, a request's own
``chat_template`` (with ``--trust-request-chat-template``), and ``LLM.chat`` giving the
server's answer.

One server: the tiny Qwen3 checkpoint, which ships no chat template, given a Qwen3-style one
with ``--chat-template FILE``, and ``--allow-unknown-fields``; the offline engine on the same
checkpoint and limits, given the same template as text.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from metroline.engine.chat_templates import (
    ChatTemplateError,
    load_chat_template,
    render_chat,
)
from metroline.engine.checkpoint import load_tokenizer
from metroline.engine.server.args import ServerArgs

from .conftest import MAX_MODEL_LEN, MODEL_NAME

#: Qwen3's chat template, trimmed to what these tests use: ChatML turns, and an empty
#: thinking block after the generation prompt when ``enable_thinking`` is false.
QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
MESSAGES = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "def fibonacci(n):"},
]
GREEDY = {"temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="module")
def qwen3(tiny_checkpoint) -> Path:
    return tiny_checkpoint("qwen3")


@pytest.fixture(scope="module")
def template_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("template") / "qwen3.jinja"
    path.write_text(QWEN3_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def qwen3_server(start_module_server, qwen3, template_file):
    return start_module_server(
        qwen3,
        "--served-model-name", MODEL_NAME,
        "--max-model-len", str(MAX_MODEL_LEN),
        "--kv-cache-memory-bytes", str(2**22),
        "--chat-template", str(template_file),
        "--trust-request-chat-template",
        "--allow-unknown-fields",
    )  # fmt: skip


@pytest.fixture(scope="module")
def http(qwen3_server):
    with httpx.Client(base_url=qwen3_server.url, timeout=60) as client:
        yield client


def body(**fields) -> dict:
    return {"model": MODEL_NAME, "messages": MESSAGES, **GREEDY, **fields}


@pytest.fixture(scope="module")
def chat(http):
    """``chat(**fields)``: a chat completion request (greedy, 8 tokens) and its answer."""
    return lambda **fields: http.post("/v1/chat/completions", json=body(**fields))


def stream_events(http: httpx.Client, **fields) -> list[dict]:
    with http.stream("POST", "/v1/chat/completions", json=body(stream=True, **fields)) as reply:
        assert reply.status_code == 200
        lines = [line for line in reply.iter_lines() if line.startswith("data: {")]
    return [json.loads(line[len("data: ") :]) for line in lines]


@pytest.fixture(scope="module")
def qwen3_llm(qwen3):
    from metroline.engine import LLM

    llm = LLM(model=str(qwen3), max_model_len=MAX_MODEL_LEN, kv_cache_memory_bytes=2**22)
    yield llm
    llm.shutdown()


def offline_chat(llm, messages=MESSAGES, **options):
    from metroline.engine import SamplingParams

    params = SamplingParams(**GREEDY)
    return llm.chat(messages, params, use_tqdm=False, chat_template=QWEN3_TEMPLATE, **options)


def test_llm_chat_equals_the_servers_chat_answer(chat, qwen3_llm):
    kwargs = {"enable_thinking": False}
    (offline,) = offline_chat(qwen3_llm, chat_template_kwargs=kwargs)
    assert offline.prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    answer = chat(chat_template_kwargs=kwargs).json()
    assert answer["choices"][0]["message"]["content"] == offline.outputs[0].text
    assert answer["usage"]["prompt_tokens"] == len(offline.prompt_token_ids)
    # Without the variable, the template leaves the thinking block out: a shorter prompt.
    plain = chat().json()
    assert plain["usage"]["prompt_tokens"] < answer["usage"]["prompt_tokens"]


def test_llm_chat_takes_a_list_of_conversations(qwen3_llm):
    other = [{"role": "user", "content": "import os"}]
    outputs = offline_chat(qwen3_llm, [MESSAGES, other])
    assert [o.prompt.count("<|im_start|>") for o in outputs] == [3, 2]
    (alone,) = offline_chat(qwen3_llm, other)
    assert outputs[1].outputs[0].text == alone.outputs[0].text


def test_continue_final_message_and_echo(chat, http, qwen3_llm):
    start = [*MESSAGES, {"role": "assistant", "content": "    if n < 2"}]
    options = {"add_generation_prompt": False, "continue_final_message": True}
    (offline,) = offline_chat(qwen3_llm, start, **options)
    assert offline.prompt.endswith("<|im_start|>assistant\n    if n < 2")
    answer = chat(messages=start, **options).json()
    assert answer["choices"][0]["message"]["content"] == offline.outputs[0].text
    echoed = chat(messages=start, echo=True, **options).json()
    assert echoed["choices"][0]["message"]["content"] == "    if n < 2" + offline.outputs[0].text
    events = stream_events(http, messages=start, echo=True, **options)
    contents = [e["choices"][0]["delta"].get("content") for e in events if e["choices"]]
    assert contents[1] == "    if n < 2"
    assert "".join(c or "" for c in contents) == echoed["choices"][0]["message"]["content"]
    # echo only repeats an assistant's message.
    plain = chat(echo=True).json()["choices"][0]["message"]["content"]
    assert plain == chat().json()["choices"][0]["message"]["content"]


def test_continue_final_message_is_checked(chat, qwen3):
    both = chat(continue_final_message=True)
    assert both.status_code == 400 and both.json()["error"]["param"] == "continue_final_message"
    not_assistant = chat(continue_final_message=True, add_generation_prompt=False)
    assert not_assistant.status_code == 400
    assert "assistant" in not_assistant.json()["error"]["message"]
    with pytest.raises(ChatTemplateError, match="continue_final_message"):
        render_chat(load_tokenizer(qwen3), MESSAGES, chat_template=QWEN3_TEMPLATE,
                    add_generation_prompt=False, continue_final_message=True)  # fmt: skip


def test_a_request_may_bring_its_own_template_on_a_trusting_server(chat):
    own = chat(chat_template="{{ messages[-1]['content'] }}").json()
    plain = chat().json()
    assert own["usage"]["prompt_tokens"] < plain["usage"]["prompt_tokens"]
    broken = chat(chat_template="{% for %}")
    assert broken.status_code == 400 and broken.json()["error"]["param"] == "chat_template"
    reserved = chat(chat_template_kwargs={"add_generation_prompt": False})
    assert reserved.status_code == 400
    assert reserved.json()["error"]["param"] == "chat_template_kwargs"


def test_allow_unknown_fields_logs_each_name_and_answers(chat, qwen3_server):
    first = chat(frobnicate=1)
    second = chat(frobnicate=2)
    assert first.status_code == second.status_code == 200, first.text
    log = qwen3_server.log()
    assert log.count("ignoring the unknown request field 'frobnicate'") == 1


def test_chat_template_flag_takes_a_file_or_the_text(template_file, tmp_path):
    assert load_chat_template(str(template_file)) == QWEN3_TEMPLATE
    assert load_chat_template("{{ messages }}") == "{{ messages }}"
    assert ServerArgs(served_model_names=("m",), chat_template=str(template_file))
    for value, message in [
        (str(tmp_path / "missing.jinja"), "neither a file nor a Jinja template"),
        ("{% if %}", "not a valid Jinja template"),
        ("{{ x }}" * 30_000, "more than the"),
    ]:
        with pytest.raises(ValueError, match=message) as caught:
            ServerArgs(served_model_names=("m",), chat_template=value)
        assert "--chat-template" in str(caught.value)


def test_a_model_without_a_template_is_told_about_the_flag(qwen3, qwen3_llm):
    tokenizer = load_tokenizer(qwen3)  # the tiny checkpoint ships no template
    with pytest.raises(ChatTemplateError, match="--chat-template") as caught:
        render_chat(tokenizer, MESSAGES)
    assert caught.value.param == "messages"
    with pytest.raises(ValueError, match=r"LLM.chat\(chat_template=...\)"):
        qwen3_llm.chat(MESSAGES, use_tqdm=False)
