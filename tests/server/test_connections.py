"""Connection limits: a cap on open connections fitted to the file-descriptor limit (idle ones
make room for new ones, busy ones mean a canned 503), a header timeout against silent and
slowloris clients, and logs that stay bounded when such clients come in bulk."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http.client
import json
import logging
import re
import resource
import socket
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from metroline.engine.server.connections import FD_RESERVE, PROBE_SLOTS, connection_cap
from metroline.engine.server.log_floods import LoopErrorHandler, RepeatLimiter

from .conftest import ServerProcess

MODEL = "tiny-conn"
ARGS = ("--served-model-name", MODEL, "--max-model-len", "128",
        "--kv-cache-memory-bytes", str(2**21))  # fmt: skip
FD_LIMIT = 1024
IDLE_CONNECTIONS = 1100
#: The issue's acceptance bound for a probe while an attacker holds the cap.
PROBE_BOUND_S = 1.0
#: Generous bounds for "eventually", far above the timeouts under test.
EVENTUALLY_S = 30.0


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def fd_limit_for_new_processes(limit: int) -> Iterator[None]:
    """Processes started inside (the server, and the engine core it spawns) get ``limit``
    as soft and hard ``RLIMIT_NOFILE``."""
    popen = subprocess.Popen

    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    def limited_popen(*args, **kwargs):
        return popen(*args, preexec_fn=set_limit, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess, "Popen", limited_popen)
        yield


@pytest.fixture(scope="module")
def servers(start_module_server, chat_checkpoint) -> dict[str, ServerProcess]:
    """Two servers, started side by side (start-up is most of this module's time):

    - ``limited``: 1,024 file descriptors, and a header timeout longer than the tests (so
      that only the connection cap closes idle sockets);
    - ``small``: four connections at most, one second to send a request head, a long
      keep-alive.
    """
    with fd_limit_for_new_processes(FD_LIMIT):
        limited = start_module_server(chat_checkpoint, *ARGS, "--header-timeout", "300",
                                      wait=False)  # fmt: skip
    small = start_module_server(
        chat_checkpoint, *ARGS, "--max-connections", "4", "--header-timeout", "1",
        "--keep-alive-timeout", "60", wait=False,
    )  # fmt: skip
    return {"limited": limited.wait_ready(), "small": small.wait_ready()}


@pytest.fixture
def small_server(servers) -> ServerProcess:
    return servers["small"]


def ensure_own_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} file descriptors; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (a look that neither waits nor reads)."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.settimeout(timeout)


def timed_probes(url: str, count: int) -> list[tuple[int, float]]:
    """``count`` GET /health, each on a new connection (as kubelet probes): (status, s)."""
    results = []
    no_reuse = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=url, limits=no_reuse, timeout=10) as client:
        for _ in range(count):
            started = time.monotonic()
            response = client.get("/health")
            results.append((response.status_code, time.monotonic() - started))
    return results


def test_idle_sockets_beyond_the_fd_limit_leave_probes_and_requests_working(servers):
    """1,100 idle sockets against a server limited to 1,024 descriptors: the server closes
    the longest-idle ones instead of running out of descriptors, probes and requests get
    through, and the log stays small."""
    ensure_own_fd_limit(IDLE_CONNECTIONS + 512)
    server = servers["limited"]
    assert resource.prlimit(server.process.pid, resource.RLIMIT_NOFILE) == (FD_LIMIT, FD_LIMIT)
    cap = int(re.search(r"accepting at most (\d+) connections", server.log()).group(1))
    assert cap == connection_cap(4096, FD_LIMIT) == FD_LIMIT - FD_RESERVE
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=EVENTUALLY_S)
            for _ in range(IDLE_CONNECTIONS)]  # fmt: skip
    try:
        # Once every socket is counted, exactly the cap stays open: the rest were closed.
        wait_for(lambda: sum(map(closed_by_server, idle)) >= IDLE_CONNECTIONS - cap,
                 EVENTUALLY_S, "the server to close the idle sockets beyond its cap")  # fmt: skip
        probes = timed_probes(server.url, 5)
        assert all(status == 200 for status, _ in probes), probes
        assert all(seconds < PROBE_BOUND_S for _, seconds in probes), probes
        body = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 4, "ignore_eos": True}
        completion = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert completion.status_code == 200, completion.text
        assert completion.json()["usage"]["completion_tokens"] == 4
        # Each newcomer closed one idle socket more, oldest first: the first one is gone.
        assert closed_by_server(idle[0])
    finally:
        for sock in idle:
            sock.close()
    log = server.log()
    assert len(log.encode()) < 200_000
    assert "Too many open files" not in log and "out of system resource" not in log
    assert log.count("connections open (the cap)") <= 2  # the first, then one summary line
    assert server.stop() == 0


def trickle_until_closed(sock: socket.socket, data: bytes, timeout: float) -> bool:
    """Send ``data`` one byte per 0.5 s until the server closes ``sock``; True if it did
    within ``timeout`` (and before all of ``data`` was sent)."""
    deadline = time.monotonic() + timeout
    for i in range(len(data)):
        if closed_by_server(sock):
            return True
        if time.monotonic() > deadline:
            return False
        try:
            sock.sendall(data[i : i + 1])
        except (BrokenPipeError, ConnectionResetError):
            return True
        time.sleep(0.5)
    return False


def test_a_connection_that_sends_nothing_is_closed(small_server):
    with socket.create_connection(("127.0.0.1", small_server.port)) as sock:
        sock.settimeout(EVENTUALLY_S)
        assert sock.recv(1) == b""  # closed (a timeout raises instead)


def test_slowloris_is_cut_off_on_the_first_and_later_requests(small_server):
    # 200 bytes at one per 0.5 s would take 100 s: only the header timeout stops it sooner.
    trickle = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 160
    with socket.create_connection(("127.0.0.1", small_server.port)) as sock:
        assert trickle_until_closed(sock, trickle, EVENTUALLY_S)
    # On a keep-alive connection, the clock starts at the next request's first byte (the
    # keep-alive timeout, 60 s, is too long to be what closes it).
    with socket.create_connection(("127.0.0.1", small_server.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(EVENTUALLY_S)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        assert trickle_until_closed(sock, trickle, EVENTUALLY_S)


def test_keep_alive_client_makes_several_requests_on_one_connection(small_server):
    connection = http.client.HTTPConnection("127.0.0.1", small_server.port, timeout=60)
    body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 2})
    try:
        local_ports = set()
        for i in range(4):
            if i == 2:
                time.sleep(1.5)  # idle past the header timeout: keep-alive governs idleness
            if i == 3:
                connection.request("POST", "/v1/completions", body,
                                   {"Content-Type": "application/json"})  # fmt: skip
            else:
                connection.request("GET", "/health")
            local_ports.add(connection.sock.getsockname()[1])
            response = connection.getresponse()
            assert response.status == 200, response.read()
            response.read()
        assert len(local_ports) == 1
    finally:
        connection.close()


def busy_connection(port: int, body: bytes) -> socket.socket:
    """A connection whose request head the server has read and whose body it waits for."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=EVENTUALLY_S)
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n")  # fmt: skip
    sock.sendall(head.encode())
    assert sock.recv(4096).startswith(b"HTTP/1.1 100")  # the app is reading the body
    return sock


def assert_too_many_connections(response: httpx.Response) -> None:
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.headers["connection"] == "close"
    error = response.json()["error"]
    assert isinstance(error.pop("message"), str)
    assert error == {"type": "service_unavailable", "param": None,
                     "code": "too_many_connections"}  # fmt: skip


def test_cap_with_every_connection_busy_keeps_probes_and_answers_503(small_server):
    """At the cap with every connection busy, a newcomer gets a probe slot: probes are
    served, anything else is answered 503; with every probe slot taken too, the newcomer
    is answered 503 at once."""
    body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 2}).encode()
    busy = [busy_connection(small_server.port, body) for _ in range(4)]
    slots: list[socket.socket] = []
    try:
        assert httpx.get(f"{small_server.url}/health", timeout=10).status_code == 200
        refused = httpx.post(f"{small_server.url}/v1/completions", content=body, timeout=10)
        assert_too_many_connections(refused)
        # Fill every probe slot with a silent connection: the next one is refused at once.
        slots = [socket.create_connection(("127.0.0.1", small_server.port))
                 for _ in range(PROBE_SLOTS)]  # fmt: skip
        assert_too_many_connections(httpx.get(f"{small_server.url}/health", timeout=10))
        # The busy ones were untouched: one finishes, and its idle connection makes room.
        for sock in slots:
            sock.close()
        busy[0].sendall(body)
        assert busy[0].recv(4096).startswith(b"HTTP/1.1 200")
        assert httpx.get(f"{small_server.url}/health", timeout=10).status_code == 200
    finally:
        for sock in busy + slots:
            sock.close()


def test_a_flood_of_bad_requests_is_logged_once(small_server):
    """uvicorn warns once per malformed request: the first warning is logged, the rest
    counted (a summary line at most once per 10 s)."""
    for _ in range(50):
        with socket.create_connection(("127.0.0.1", small_server.port)) as sock:
            sock.settimeout(EVENTUALLY_S)
            sock.sendall(b"NOT HTTP\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 400")
    assert httpx.get(f"{small_server.url}/health", timeout=10).status_code == 200
    assert 1 <= small_server.log().count("Invalid HTTP request received.") <= 2


def test_repeat_limiter_logs_first_then_one_summary_per_window():
    now = [0.0]
    reports: list[tuple[str, int]] = []
    limiter = RepeatLimiter(lambda key, count, _: reports.append((key, count)), window=10,
                            max_kinds=3, clock=lambda: now[0])  # fmt: skip
    assert limiter.admit("emfile")
    assert not any(limiter.admit("emfile") for _ in range(1000))
    now[0] = 9.9
    limiter.flush()
    assert reports == []
    now[0] = 10.0
    limiter.flush()
    assert reports == [("emfile", 1000)]
    assert not limiter.admit("emfile")  # the flood goes on: counted in the new window
    now[0] = 20.0
    limiter.flush()
    now[0] = 30.0
    limiter.flush()  # a quiet window: forgotten
    assert reports == [("emfile", 1000), ("emfile", 1)]
    assert limiter.admit("emfile")
    # However many kinds, a bounded number is logged in full.
    admitted = sum(limiter.admit(f"kind {i}") for i in range(1000))
    assert admitted == 3


def test_loop_error_handler_bounds_asyncio_accept_errors(caplog):
    """asyncio's accept loop calls the loop's exception handler once per failed accept()."""
    loop = asyncio.new_event_loop()
    limiter = RepeatLimiter(lambda key, count, _: logging.warning("%d more %s", count, key))
    loop.set_exception_handler(LoopErrorHandler(limiter))
    error = OSError(errno.EMFILE, "Too many open files")
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            for _ in range(10_000):
                loop.call_exception_handler(
                    {"message": "socket.accept() out of system resource", "exception": error}
                )
    finally:
        loop.close()
    limiter.flush(everything=True)
    assert [r.levelname for r in caplog.records] == ["ERROR", "WARNING"]
    assert "Too many open files" in caplog.text and "9999 more" in caplog.text
