"""schemathesis against the server's own OpenAPI schema, on the two generation endpoints
(``POST /v1/completions``, ``POST /v1/chat/completions``): 300 examples each plus
schemathesis' coverage phase, every check except "schema-valid requests are accepted" (a
schema cannot know a prompt's token count), response-schema checks included: no 500s, no
hangs, every answer as documented, and the engine still serves afterwards.

Bounded: a fixed example count and seed, and a server on which every accepted request is
cheap (``--max-model-len 24``, at most 16 sequences per request), so the run stays near a
minute on a small CPU machine. The documented shape of streamed answers is checked on its
own as well, with requests that surely stream (random generation reaches a 200 stream only
now and then)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from .conftest import API_KEY, MODEL_NAME

AUTH = {"Authorization": f"Bearer {API_KEY}"}
#: Examples per operation in schemathesis' fuzzing phase.
MAX_EXAMPLES = 300
OPERATIONS = ("/v1/completions", "/v1/chat/completions")


@pytest.fixture(scope="module")
def fuzz_server(start_module_server, chat_checkpoint):
    return start_module_server(
        chat_checkpoint,
        "--served-model-name", MODEL_NAME,
        "--max-model-len", "24",
        "--max-sequences-per-request", "16",
        "--kv-cache-memory-bytes", str(4 * 2**20),
        "--api-key", API_KEY,
    )  # fmt: skip


def test_schemathesis_finds_no_server_errors(fuzz_server, tmp_path):
    executable = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert executable is not None
    log_start = len(fuzz_server.log())
    result = subprocess.run(
        [
            executable, "run", f"{fuzz_server.url}/openapi.json",
            "--header", f"Authorization: Bearer {API_KEY}",
            "--include-path-regex", "^/v1/(chat/)?completions$",
            "--checks", "all", "--exclude-checks", "positive_data_acceptance",
            "--max-examples", str(MAX_EXAMPLES), "--seed", "1",
            "--request-timeout", "30", "--max-response-time", "30",
            "--generation-database", "none", "--no-color",
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    output = result.stdout[-8000:] + result.stderr[-2000:]
    assert result.returncode == 0, output
    assert f"{len(OPERATIONS)} selected" in result.stdout, output
    log = fuzz_server.log()[log_start:]
    assert "internal error" not in log, log[-4000:]
    assert httpx.get(f"{fuzz_server.url}/health").status_code == 200
    reply = httpx.post(
        f"{fuzz_server.url}/v1/completions",
        json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 2},
        headers=AUTH,
    )
    assert reply.status_code == 200


CHAT = [{"role": "user", "content": "hi"}]
ANSWERS = [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "stream": True}),
    ("/v1/completions", {"prompt": ["a", "b"], "max_tokens": 2, "n": 2, "stream": True,
                         "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, "stream": True}),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, "stream": True,
                              "stream_options": {"include_usage": True}, "logprobs": True,
                              "top_logprobs": 2}),
    ("/v1/chat/completions", {"messages": [], "stream": True}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "fields"),
    ANSWERS,
    ids=[
        f"{'chat' if 'chat' in path else 'cmpl'}-{'stream' if f.get('stream') else 'json'}-{i}"
        for i, (path, f) in enumerate(ANSWERS)
    ],
)
def test_answers_match_the_documented_schema(fuzz_server, path, fields):
    """schemathesis' own response validation (the check behind ST108) on answers that
    surely take each documented shape: JSON, server-sent events, an error."""
    import schemathesis

    schema = schemathesis.openapi.from_dict(httpx.get(f"{fuzz_server.url}/openapi.json").json())
    response = httpx.post(
        fuzz_server.url + path, json={"model": MODEL_NAME, **fields}, headers=AUTH, timeout=30
    )
    schema[path]["POST"].validate_response(response)
