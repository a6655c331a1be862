"""schemathesis against the server's own OpenAPI schema: every check except "schema-valid
requests are accepted" (a schema cannot know a prompt's token count), no 500s, no hangs, and
the engine still serves afterwards. Bounded: a short max_model_len and a fixed example count
and seed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from .conftest import API_KEY, MODEL_NAME


def test_schemathesis_finds_no_server_errors(start_server, chat_checkpoint, tmp_path):
    server = start_server(
        chat_checkpoint,
        "--served-model-name", MODEL_NAME,
        "--max-model-len", "32",
        "--api-key", API_KEY,
    )  # fmt: skip
    executable = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert executable is not None
    result = subprocess.run(
        [
            executable, "run", f"{server.url}/openapi.json",
            "--header", f"Authorization: Bearer {API_KEY}",
            "--checks", "all", "--exclude-checks", "positive_data_acceptance",
            "--max-examples", "15", "--seed", "1",
            "--request-timeout", "30", "--max-response-time", "30",
            "--generation-database", "none", "--no-color",
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "internal error" not in server.log()
    assert httpx.get(f"{server.url}/health").status_code == 200
    reply = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 2},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert reply.status_code == 200
