"""The README's first command: `make serve` serves the embedded demo model, which ships in the
repository (a fresh clone has it), and answers `def fibonacci(n):` with Python."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx

from metroline.engine.demo import demo_model_path

ROOT = Path(__file__).resolve().parents[2]
#: What the issue allows the shipped weights to weigh.
MAX_WEIGHT_BYTES = 25 * 1024 * 1024


def test_readme_starts_with_make_serve_then_make_test():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make serve", "make test"]
    assert "def fibonacci(n):" in readme


def test_make_serve_installs_then_serves_the_demo_model():
    plan = subprocess.run(
        # --no-print-directory: under `make test` this runs as a sub-make, which would add
        # "Entering/Leaving directory" lines.
        ["make", "--no-print-directory", "-n", "-B", "serve"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "pip install -q -e ." in plan
    assert plan.strip().splitlines()[-1] == ".venv/bin/metroline serve demo --port 8000"


def test_a_fresh_clone_has_the_demo_model(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    files = subprocess.run(
        ["git", "ls-files", "engine/demo/model"], cwd=clone, capture_output=True, text=True
    ).stdout.split()
    names = {Path(f).name for f in files}
    assert "config.json" in names and "tokenizer.json" in names, files
    weights = [clone / f for f in files if f.endswith(".safetensors")]
    assert weights
    assert sum(w.stat().st_size for w in weights) <= MAX_WEIGHT_BYTES
    assert all(not w.read_bytes().startswith(b"version https://git-lfs") for w in weights)


def test_demo_model_answers_fibonacci_with_python(demo_server):
    assert (demo_model_path() / "config.json").is_file()
    models = httpx.get(f"{demo_server.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["demo"]
    response = httpx.post(
        f"{demo_server.url}/v1/completions",
        json={"model": "demo", "prompt": "def fibonacci(n):", "max_tokens": 64, "temperature": 0},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    text = response.json()["choices"][0]["text"]
    # Recognisable Python: an indented body that opens with a docstring or a statement.
    body = re.search(r"^(?: {4}|\t)+(\S.*)$", text, re.MULTILINE)
    assert body is not None, text
    assert re.match(r'("""|\'\'\'|#|return\b|if\b|for\b|while\b|try\b|\w+ = )', body.group(1)), text
    chat = httpx.post(
        f"{demo_server.url}/v1/chat/completions",
        json={
            "model": "demo",
            "messages": [{"role": "user", "content": "def fibonacci(n):"}],
            "max_tokens": 16,
        },
        timeout=120,
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["completion_tokens"] >= 1
