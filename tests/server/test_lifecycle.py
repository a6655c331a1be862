"""Process life cycle: SIGTERM drains (in-flight requests finish, new ones get 503, exit 0);
a dead engine core turns /health 503 and the server exits non-zero; a dead server takes its
engine core with it."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx

MODEL = "tiny-life"
ARGS = ("--served-model-name", MODEL, "--max-model-len", "128",
        "--kv-cache-memory-bytes", str(2**21))  # fmt: skip


def stream_text(url: str, max_tokens: int, events: list[str]) -> None:
    body = {"model": MODEL, "prompt": "def f(x):", "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        events.append(f"status {response.status_code}")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: ") :])


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def get_or_none(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return None


def requests_in_engine(url: str) -> int:
    """Running plus waiting requests as ``/ready`` reports them after the latest engine step."""
    response = get_or_none(f"{url}/ready")
    if response is None:
        return 0
    body = response.json()
    return body.get("num_requests_running", 0) + body.get("num_requests_waiting", 0)


def test_probes_while_loading(start_server, chat_checkpoint):
    """uvicorn answers within a second; the engine core needs seconds to import torch and
    load: meanwhile the pod is alive but not ready, and work is refused with 503."""
    server = start_server(chat_checkpoint, *ARGS, wait=False)
    seen = None
    deadline = time.monotonic() + 60
    while seen is None and time.monotonic() < deadline:
        seen = get_or_none(f"{server.url}/ready")
        time.sleep(0.02)
    assert seen is not None and seen.status_code == 503, seen and seen.text
    assert seen.json()["reason"].startswith("loading")
    assert httpx.get(f"{server.url}/health").status_code == 200
    refused = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "loading"
    assert refused.headers["retry-after"]
    server.wait_ready()
    assert server.stop() == 0


#: Long enough (~0.6 s of steps on a 2-core CPU) that all four drained requests are in the
#: engine together even when the client threads start late on a loaded machine.
DRAIN_TOKENS = 400


def test_sigterm_drains_in_flight_requests_and_exits_zero(start_server, chat_checkpoint):
    server = start_server(chat_checkpoint, "--served-model-name", MODEL, "--max-model-len",
                          "512", "--log-format", "json")  # fmt: skip
    streams: list[list[str]] = [[] for _ in range(3)]
    finals: list[httpx.Response] = []
    body = {"model": MODEL, "prompt": "x = 1", "max_tokens": DRAIN_TOKENS, "ignore_eos": True}
    threads = [
        threading.Thread(target=stream_text, args=(server.url, DRAIN_TOKENS, events))
        for events in streams
    ] + [
        threading.Thread(
            target=lambda: finals.append(
                httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
            )
        )
    ]
    for thread in threads:
        thread.start()
    wait_for(lambda: all(len(events) >= 2 for events in streams), 30, "streams to start")
    # The non-streaming request shows no events: SIGTERM only once the engine holds all four.
    wait_for(lambda: requests_in_engine(server.url) >= 4, 30, "all four requests in the engine")
    server.process.send_signal(signal.SIGTERM)
    wait_for(lambda: (r := get_or_none(f"{server.url}/ready")) is None or r.status_code == 503,
             2, "/ready 503")  # fmt: skip
    refused = httpx.post(f"{server.url}/v1/completions", json=body, timeout=5)
    assert refused.status_code == 503
    assert refused.headers["retry-after"]
    assert refused.json()["error"]["code"] == "draining"
    assert httpx.get(f"{server.url}/health").status_code == 200
    for thread in threads:
        thread.join(120)
    for events in streams:
        assert events[0] == "status 200" and events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[1:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert finals[0].status_code == 200
    assert finals[0].json()["usage"]["completion_tokens"] == DRAIN_TOKENS
    assert server.process.wait(60) == 0, server.log()
    # Structured logs: JSON lines, one per finished request with its numbers.
    entries = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    finished = [e for e in entries if e["message"] == "request finished"]
    assert len(finished) == 4
    for entry in finished:
        assert entry["request_id"].startswith("cmpl-")
        assert entry["output_tokens"] == DRAIN_TOKENS and entry["prompt_tokens"] > 0
        assert 0 < entry["ttft_s"] <= entry["total_s"]
    assert any(e["message"].startswith("draining") for e in entries)


def child_pids(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status").read_text()
    return "State:\tZ" not in status


def test_dead_engine_core_fails_health_and_exits_nonzero(start_server, chat_checkpoint):
    server = start_server(chat_checkpoint, "--served-model-name", MODEL, "--max-model-len", "512")
    events: list[str] = []
    # Long enough to be mid-stream when the core is killed, however late this thread runs.
    streaming = threading.Thread(target=stream_text, args=(server.url, DRAIN_TOKENS, events))
    streaming.start()
    wait_for(lambda: len(events) >= 2, 30, "the stream to start")
    os.kill(server.core_pid(), signal.SIGKILL)
    health = None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        health = get_or_none(f"{server.url}/health")
        if health is None or health.status_code == 503:
            break
        time.sleep(0.02)
    assert health is not None and health.status_code == 503, "health never turned 503"
    assert "engine" in health.json()["reason"]
    streaming.join(30)
    assert events[-1] == "[DONE]"
    assert any('"error"' in e for e in events)
    assert server.process.wait(60) != 0


def test_engine_core_dies_with_its_killed_server(start_server, chat_checkpoint):
    server = start_server(chat_checkpoint, *ARGS)
    core = server.core_pid()
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(30)
    wait_for(lambda: not alive(core), 15, "the engine core to exit")
