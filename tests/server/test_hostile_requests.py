"""Hostile requests: no single request can crash, stall or exhaust the server.

One real server (tiny llama, ``--max-model-len 64``, an API key) gets every case in the table
(``hostile_cases.py``), on both generation endpoints, streaming and not where that takes
another path. Each case must be answered with a 4xx in OpenAI's error shape (``param`` naming
the field where the contract names one); after each case ``/health`` must be 200 and a 1-token
completion must succeed. A case that leaves the server dead fails, and the next case gets a
fresh server, so that one fatal request does not hide what the others do.

The limits under test are the contract's defaults: ``--max-request-bytes`` 16 MiB (413 above,
also when chunked), ``--max-sequences-per-request`` 256 (prompts x ``n``), token ids inside the
vocabulary, bounded stop lists, message lists and nesting.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from .conftest import API_KEY, MODEL_NAME, ServerProcess
from .hostile_cases import CASES, COMPLETIONS, Case

MAX_MODEL_LEN = 64
SERVER_ARGS = (
    "--served-model-name", MODEL_NAME,
    "--max-model-len", str(MAX_MODEL_LEN),
    "--kv-cache-memory-bytes", str(4 * 2**20),
    "--api-key", API_KEY,
)  # fmt: skip
#: Seconds any one exchange may take before the case counts as a stall.
TIMEOUT_S = 30.0
#: Seconds to wait for an answer that must come before the (never sent) rest of the body.
EARLY_ANSWER_TIMEOUT_S = 10.0
AUTH = {"Authorization": f"Bearer {API_KEY}"}


# --- talking to the server --------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def describe(self) -> str:
        return f"{self.status} {self.body[:600]!r}"


def request_headers(case: Case) -> dict[str, str]:
    headers = {"content-type": "application/json", "authorization": AUTH["Authorization"]}
    for name, value in case.headers.items():
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    return headers


def send(server: ServerProcess, client: httpx.Client, case: Case) -> Answer:
    if case.transport == "httpx":
        response = client.post(
            server.url + case.path,
            content=case.payload(),
            headers=request_headers(case),
            timeout=TIMEOUT_S,
        )
        return Answer(response.status_code, dict(response.headers), response.content)
    return send_raw(server, case)


def send_raw(server: ServerProcess, case: Case) -> Answer:
    """One HTTP/1.1 exchange over a plain socket: the body (if any) is written by a thread
    while this one reads, so that an answer sent before the body was read is still seen."""
    headers = request_headers(case)
    timeout = TIMEOUT_S
    if case.transport == "sized":
        payload = case.payload()
        headers["content-length"] = str(len(payload))
        chunks: Iterable[bytes] = (payload[i : i + 2**20] for i in range(0, len(payload), 2**20))
    elif case.transport == "chunked":
        headers["transfer-encoding"] = "chunked"
        chunks = _chunked(case.payload())
    elif case.transport == "declared":
        headers["content-length"] = str(case.declared_length)
        chunks = [case.raw] if case.raw else []
        timeout = EARLY_ANSWER_TIMEOUT_S
    else:
        raise AssertionError(case.transport)
    head = f"POST {case.path} HTTP/1.1\r\nhost: 127.0.0.1:{server.port}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "connection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(head.encode())

        def write() -> None:
            try:
                for chunk in chunks:
                    sock.sendall(chunk)
            except OSError:  # the server answered and closed: what it said is read below
                pass

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        try:
            return _read_response(sock, timeout)
        finally:
            writer.join(timeout=5)


def _chunked(data: bytes, size: int = 2**20) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        piece = data[start : start + size]
        yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    yield b"0\r\n\r\n"


def _read_response(sock: socket.socket, timeout: float) -> Answer:
    buffer = b""

    def more() -> bool:
        nonlocal buffer
        try:
            data = sock.recv(65536)
        except TimeoutError as error:
            raise AssertionError(f"no complete answer within {timeout} s: {buffer!r}") from error
        except ConnectionResetError:
            return False
        buffer += data
        return bool(data)

    while b"\r\n\r\n" not in buffer:
        if not more():
            raise AssertionError(f"connection closed before an answer: {buffer!r}")
    head, _, rest = buffer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    buffer = rest
    if "content-length" in headers:
        length = int(headers["content-length"])
        while len(buffer) < length and more():
            pass
        return Answer(status, headers, buffer[:length])
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while not buffer.endswith(b"0\r\n\r\n") and more():
            pass
        body, data = b"", buffer
        while data:
            size_line, _, data = data.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            body, data = body + data[:size], data[size + 2 :]
        return Answer(status, headers, body)
    while more():
        pass
    return Answer(status, headers, buffer)


# --- checks ---------------------------------------------------------------------------------


def _names(param: Any, expected: str | tuple[str, ...]) -> bool:
    options = (expected,) if isinstance(expected, str) else expected
    return isinstance(param, str) and any(
        param == option or param.startswith(option + ".") for option in options
    )


def error_body_problems(error: Any, where: str) -> list[str]:
    """What is wrong with one OpenAI error object (``{"message", "type", "param", "code"}``)."""
    if not isinstance(error, dict):
        return [f"{where}: error is not an object: {error!r}"]
    problems = []
    if not isinstance(error.get("message"), str) or not error["message"]:
        problems.append(f"{where}: error.message is not a non-empty string: {error!r}")
    if not isinstance(error.get("type"), str):
        problems.append(f"{where}: error.type is not a string: {error!r}")
    for key in ("param", "code"):
        if key not in error or not (error[key] is None or isinstance(error[key], str)):
            problems.append(f"{where}: error.{key} is not a string or null: {error!r}")
    return problems


def stream_error_problems(body: bytes) -> list[str]:
    """Error events (``data: {"error": ...}``) inside a server-sent event stream."""
    problems = []
    for line in body.decode("utf-8", "replace").splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        try:
            event = json.loads(line[len("data: ") :])
        except ValueError:
            problems.append(f"stream event is not JSON: {line[:200]!r}")
            continue
        if isinstance(event, dict) and "error" in event:
            problems.append(f"stream error event: {line[:300]}")
            problems += error_body_problems(event["error"], "stream error event")
    return problems


def answer_problems(case: Case, answer: Answer) -> list[str]:
    problems = []
    if answer.status != case.status:
        problems.append(f"status {answer.status}, expected {case.status}")
    if answer.headers.get("content-type", "").startswith("text/event-stream"):
        problems.append("answered with a stream")
        return problems + stream_error_problems(answer.body)
    try:
        body = json.loads(answer.body)
    except ValueError:
        return [*problems, f"body is not JSON: {answer.body[:300]!r}"]
    if not isinstance(body, dict) or "error" not in body:
        return [*problems, "body is not OpenAI's error shape {'error': {...}}"]
    error = body["error"]
    problems += error_body_problems(error, "body")
    if not isinstance(error, dict):
        return problems
    if case.status == 400 and error.get("type") != "invalid_request_error":
        problems.append(f"error.type {error.get('type')!r}, expected 'invalid_request_error'")
    if case.param is not None and not _names(error.get("param"), case.param):
        problems.append(f"error.param {error.get('param')!r}, expected {case.param!r}")
    if case.code_required and not isinstance(error.get("code"), str):
        problems.append(f"error.code {error.get('code')!r}, expected a string")
    return problems


def serving_problems(server: ServerProcess, client: httpx.Client) -> list[str]:
    """Is the server alive and still serving: /health 200 and a 1-token completion?"""
    if server.process.poll() is not None:
        return [f"server exited with status {server.process.returncode}"]
    try:
        health = client.get(f"{server.url}/health", timeout=TIMEOUT_S)
        if health.status_code != 200:
            return [f"/health {health.status_code}: {health.text[:300]}"]
        reply = client.post(
            server.url + COMPLETIONS,
            json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 1},
            headers=AUTH,
            timeout=TIMEOUT_S,
        )
    except httpx.HTTPError as error:
        return [f"server not answering afterwards: {type(error).__name__}: {error}"]
    if reply.status_code != 200 or len(reply.json().get("choices", [])) != 1:
        return [f"a 1-token completion afterwards got {reply.status_code}: {reply.text[:300]}"]
    return []


#: What the server's log says when a request raised where it should not have.
INTERNAL_ERROR_MARKS = ("internal error", "Exception in ASGI application", "Traceback")


class Target:
    """The module's server; a case that leaves it dead fails, and the next case gets a new one
    (with the contract met, it is started once). Hostile requests and the checks after them
    go through separate keep-alive clients (a new ``httpx`` client per request costs more
    than the request), so a check never reuses a connection that carried a hostile request."""

    def __init__(self, factory, checkpoint) -> None:
        self.factory = factory
        self.checkpoint = checkpoint
        self.server: ServerProcess = factory(checkpoint, *SERVER_ARGS)
        self.broken = False
        self.restarts = 0
        self.hostile = httpx.Client(timeout=TIMEOUT_S)
        self.probe = httpx.Client(timeout=TIMEOUT_S)

    def close(self) -> None:
        self.hostile.close()
        self.probe.close()

    def get(self) -> ServerProcess:
        if self.broken:
            self.server.stop(timeout=10)
            self.server = self.factory(self.checkpoint, *SERVER_ARGS)
            self.broken = False
            self.restarts += 1
        return self.server


@pytest.fixture(scope="module")
def target(start_module_server, chat_checkpoint) -> Iterator[Target]:
    target = Target(start_module_server, chat_checkpoint)
    yield target
    target.close()


def test_the_table_is_big_and_ids_are_unique():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    assert len(CASES) >= 100


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_hostile_request_is_refused_and_the_server_keeps_serving(target, case):
    server = target.get()
    log_start = len(server.log())
    problems: list[str] = []
    answer: Answer | None = None
    try:
        answer = send(server, target.hostile, case)
    except (httpx.HTTPError, OSError, AssertionError) as error:
        problems.append(f"no answer: {type(error).__name__}: {error}")
    if answer is not None:
        problems += answer_problems(case, answer)
    after = serving_problems(server, target.probe)
    if after:
        target.broken = True
        problems += ["afterwards: " + p for p in after]
    log = server.log()[log_start:]
    internal_error = any(mark in log for mark in INTERNAL_ERROR_MARKS)
    if internal_error:
        problems.append("the server logged an internal error")
    details = [f"answer: {answer.describe() if answer is not None else '(none)'}"]
    if internal_error:
        details.append(f"server log:\n{log[-3000:]}")
    assert not problems, "\n".join(problems + details)
