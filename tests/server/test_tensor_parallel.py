"""The server with --tensor-parallel-size 2 (gloo on CPU): the engine core process starts its
worker, greedy output equals the offline single-process engine's, and SIGTERM leaves no
process behind."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from metroline.engine import SamplingParams

from .conftest import MAX_MODEL_LEN


def running(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def descendants(pid: int) -> set[int]:
    found: set[int] = set()
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except FileNotFoundError:
            continue
        for child in map(int, children):
            found.add(child)
            pending.append(child)
    return found


def test_tensor_parallel_server_matches_offline(start_server, chat_checkpoint, offline_llm):
    server = start_server(
        chat_checkpoint, "--tensor-parallel-size", "2", "--max-model-len", str(MAX_MODEL_LEN),
        "--kv-cache-memory-bytes", str(2**22), "--served-model-name", "tp",
    )  # fmt: skip
    processes = descendants(server.process.pid)
    assert len(processes) >= 2  # the engine core and its rank-1 worker
    prompts = ["def fibonacci(n):", "import os\n"]
    params = SamplingParams(temperature=0, max_tokens=12)
    expected = [o.outputs[0].text for o in offline_llm.generate(prompts, params, use_tqdm=False)]
    response = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "tp", "prompt": prompts, "max_tokens": 12, "temperature": 0},
        timeout=60,
    )
    assert [c["text"] for c in sorted(response.json()["choices"], key=lambda c: c["index"])] == (
        expected
    )
    assert server.stop() == 0
    deadline = time.monotonic() + 15
    while (alive := {pid for pid in processes if running(pid)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive
