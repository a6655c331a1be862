"""Limits where a request enters, against a real server: huge prompts are tokenised off the
event loop (the loop-lag probe and /health stay responsive), and clients without the key,
or with bodies over --max-request-bytes, cost the server almost no memory."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from .conftest import API_KEY, MODEL_NAME, metric_value

PROMPT_BYTES = 10 * 2**20
#: More huge prompts at once than the server's prepare threads (4): some wait their turn.
NUM_HUGE = 6
HUGE_BODY_BYTES = 200 * 2**20
LABEL = f'model_name="{MODEL_NAME}"'
AUTH = {"Authorization": f"Bearer {API_KEY}"}
#: Seconds a /health probe may wait before the test calls it a stall (not a speed bound).
STALL_S = 30


@pytest.fixture(scope="module")
def server(start_module_server, chat_checkpoint):
    return start_module_server(
        chat_checkpoint,
        "--served-model-name", MODEL_NAME,
        "--max-model-len", "64",
        "--kv-cache-memory-bytes", str(2**22),
        "--api-key", API_KEY,
    )  # fmt: skip


@contextlib.contextmanager
def health_probes(url: str) -> Iterator[list[float]]:
    """GET /health every 0.1 s on a thread while the block runs (each must be 200); yields
    the round trips, complete once the block has ended."""
    probes: list[float] = []
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(timeout=30) as http:
            while not done.is_set():
                started = time.monotonic()
                assert http.get(f"{url}/health").status_code == 200
                probes.append(time.monotonic() - started)
                time.sleep(0.1)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        yield probes
    finally:
        done.set()
        prober.join()


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def test_huge_prompts_are_tokenised_off_the_event_loop(server):
    # One letter over and over: of the texts tried, the cheapest to tokenise (CI time).
    text = "a" * PROMPT_BYTES
    bodies = [("/v1/completions", {"model": MODEL_NAME, "prompt": text})] * (NUM_HUGE - 2) + [
        ("/v1/chat/completions", {"model": MODEL_NAME, "messages": [
            {"role": "user", "content": text}]})
    ] * 2  # fmt: skip
    def send(path_body) -> httpx.Response:
        path, body = path_body
        return httpx.post(f"{server.url}{path}", json=body, headers=AUTH, timeout=600)

    with health_probes(server.url) as probes, ThreadPoolExecutor(NUM_HUGE) as pool:
        responses = list(pool.map(send, bodies))
    for response in responses:
        assert response.status_code == 400, response.text[:500]
        assert response.json()["error"]["code"] == "context_length_exceeded"
    # The server's own loop-lag probe (every 0.1 s) never saw the loop blocked for 5 s.
    metrics = httpx.get(f"{server.url}/metrics").text
    count = metric_value(metrics, "metroline:event_loop_lag_seconds_count", LABEL)
    under_5s = metric_value(metrics, "metroline:event_loop_lag_seconds_bucket", f'le="5.0",{LABEL}')
    assert count > 0 and under_5s == count, metrics
    # /health polled from outside answered throughout; its round trips also hold this test
    # process's own scheduling on a loaded machine, so they bound only a stall.
    assert probes and max(probes) < STALL_S, max(probes)


def send_unread_body(url: str, headers: dict[str, str], total: int) -> bytes:
    """POST a ``total``-byte body as fast as the server takes it; the server's answer."""
    host, port = url.removeprefix("http://").split(":")
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    chunk = b"x" * 2**20
    chunked = "Content-Length" not in headers
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode())
        sent = 0
        try:
            while sent < total:
                piece = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if chunked else chunk
                sock.sendall(piece)
                sent += len(chunk)
        except OSError:
            pass  # the server answered and closed: it does not read the rest
        sock.settimeout(30)
        answer = b""
        try:
            while data := sock.recv(65536):
                answer += data
        except OSError:
            pass
    return answer


def test_unauthenticated_and_oversized_bodies_cost_no_memory(server):
    before = peak_rss_bytes(server.process.pid)
    json_type = {"Content-Type": "application/json"}
    cases = [
        ({**json_type, "Content-Length": str(HUGE_BODY_BYTES)}, b" 401 "),  # no key
        ({**json_type, "Transfer-Encoding": "chunked"}, b" 401 "),  # no key, no length
        (  # the key, a declared length over the limit
            {**json_type, "Authorization": f"Bearer {API_KEY}",
             "Content-Length": str(HUGE_BODY_BYTES)},
            b" 413 ",
        ),
        (  # the key, a chunked body that passes the limit as it arrives
            {**json_type, "Authorization": f"Bearer {API_KEY}", "Transfer-Encoding": "chunked"},
            b" 413 ",
        ),
    ]  # fmt: skip
    jobs = [cases[0]] * 3 + [cases[1]] * 2 + cases[2:]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(
            pool.map(lambda job: send_unread_body(server.url, job[0], HUGE_BODY_BYTES), jobs)
        )
    for (_, status), answer in zip(jobs, answers):
        first_line = answer.split(b"\r\n", 1)[0]
        assert status in first_line, answer[:300]
        assert b'"error"' in answer and b"connection: close" in answer.lower()
    growth = peak_rss_bytes(server.process.pid) - before
    assert growth < 50 * 2**20, f"peak memory grew by {growth / 2**20:.0f} MiB"
    assert httpx.get(f"{server.url}/health").status_code == 200


def keys(prefix: str, limit: int) -> bytes:
    """``prefix`` followed by as many distinct unknown keys as fit in ``limit`` bytes."""
    parts, size, index = [prefix], len(prefix) + 1, 0
    while size < limit - 20:
        part = f', "k{index}": 0'
        parts.append(part)
        size, index = size + len(part), index + 1
    return ("".join(parts) + "}").encode()


def pathological_bodies() -> list[tuple[str, bytes]]:
    """~16 MiB bodies whose parsing or validation once held the loop for seconds each:
    millions of bad ids (one error each), of one-id lists, of content parts, of keys."""
    limit = 16 * 2**20 - 1024

    def fill(prefix: str, item: str, suffix: str) -> bytes:
        count = (limit - len(prefix) - len(suffix)) // (len(item) + 1)
        return (prefix + ",".join([item] * count) + suffix).encode()

    model = f'"model": "{MODEL_NAME}"'
    return [
        ("/v1/completions", fill(f'{{{model}, "prompt": [', "-1", "]}")),
        ("/v1/completions", fill(f'{{{model}, "prompt": [', "[1]", "]}")),
        ("/v1/chat/completions", fill(
            f'{{{model}, "messages": [{{"role": "user", "content": [',
            '{"type": "text", "text": ""}', "]}]}")),
        ("/v1/completions", keys(f'{{{model}, "prompt": "x"', limit)),
    ]  # fmt: skip


def test_pathological_json_is_refused_without_stalling_the_loop(server):
    def send(path_body) -> httpx.Response:
        path, body = path_body
        headers = {**AUTH, "Content-Type": "application/json"}
        return httpx.post(f"{server.url}{path}", content=body, headers=headers, timeout=120)

    with health_probes(server.url) as probes, ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(send, pathological_bodies()))
    # Structure, not speed: each body was refused by the shape scan, before any parse.
    for response in responses:
        assert response.status_code == 400, response.text[:300]
        assert response.json()["error"]["code"] == "request_too_complex", response.text[:300]
    # Liveness only (a stall detector, far above the milliseconds these take on an idle
    # machine): /health kept answering while the bodies were read and scanned.
    assert probes and max(probes) < STALL_S, max(probes)


def test_early_answers_reach_ordinary_clients(server):
    """A 401 or 413 given before the body is read: the server lingers, dropping the rest of
    the body, so a client that sends all of it before reading (Python's http.client, which
    requests uses) reads the answer instead of a connection reset."""
    body = b'{"prompt": "' + b"x" * (17 * 2**20) + b'"}'
    host, port = server.url.removeprefix("http://").split(":")
    for headers, status in (({}, 401), (AUTH, 413)):
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            connection.request(
                "POST",
                "/v1/completions",
                body=body,
                headers={"Content-Type": "application/json", **headers},
            )
            response = connection.getresponse()
            assert response.status == status
            assert json.loads(response.read())["error"]["message"]
        finally:
            connection.close()
