"""Server test helpers: real ``metroline serve`` processes on free local ports.

Each :class:`ServerProcess` is the command line a user runs (``python -P -m
metroline.engine.cli serve ...``), with its log in a file that failing tests print.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

API_KEY = "test-key"
MODEL_NAME = "tiny"
MAX_MODEL_LEN = 128
#: A plain "role: content" chat template for the tiny checkpoint (it ships none).
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A server subprocess; ``url`` is its base URL once :meth:`wait_ready` returned."""

    def __init__(self, model: Path | str, args: list[str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.command = [
            sys.executable, "-P", "-m", "metroline.engine.cli", "serve", str(model),
            "--host", "127.0.0.1", "--port", str(self.port), "--disable-uvicorn-access-log",
            *args,
        ]  # fmt: skip
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        env.pop("METROLINE_API_KEY", None)
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=log_path.parent
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def core_pid(self) -> int:
        """The engine core's pid: the child process running multiprocessing's spawn_main."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        for pid in children.read_text().split():
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"spawn_main" in cmdline:
                return int(pid)
        raise RuntimeError("no engine core process found")

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture(scope="session")
def chat_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny llama checkpoint plus a chat template."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("tiny-chat")
    shutil.copytree(tiny_checkpoint("llama"), directory, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(directory))
    return directory


class ServerFactory:
    """Starts servers; :meth:`stop_all` stops those it started."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.tmp_path_factory = tmp_path_factory
        self.servers: list[ServerProcess] = []

    def __call__(self, model: Path | str, *args: str, wait: bool = True) -> ServerProcess:
        """Start a server; if another process took its free port before it bound (the port
        is only picked, not held), start it again on a new one."""
        for attempt in range(3):
            log_path = self.tmp_path_factory.mktemp("server") / "server.log"
            server = ServerProcess(model, list(args), log_path)
            self.servers.append(server)
            if not wait:
                return server
            try:
                return server.wait_ready()
            except RuntimeError:
                if attempt == 2 or "address already in use" not in server.log().lower():
                    raise
        raise AssertionError("unreachable")

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture
def start_server(tmp_path_factory) -> Iterator[ServerFactory]:
    """``start_server(model, *args)`` -> a ready server, stopped when the test ends."""
    factory = ServerFactory(tmp_path_factory)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def start_module_server(tmp_path_factory) -> Iterator[ServerFactory]:
    """Like ``start_server``, for servers that the tests of one module share."""
    factory = ServerFactory(tmp_path_factory)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="session")
def server(tmp_path_factory, chat_checkpoint) -> Iterator[ServerProcess]:
    """The shared server: tiny llama with a chat template, an API key, max_model_len 128."""
    factory = ServerFactory(tmp_path_factory)
    yield factory(
        chat_checkpoint,
        "--served-model-name", MODEL_NAME,
        "--max-model-len", str(MAX_MODEL_LEN),
        "--kv-cache-memory-bytes", str(2**22),
        "--api-key", API_KEY,
    )  # fmt: skip
    factory.stop_all()


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory) -> Iterator[ServerProcess]:
    """The embedded demo model as `metroline serve demo` serves it, max_model_len 256."""
    factory = ServerFactory(tmp_path_factory)
    yield factory("demo", "--max-model-len", "256")
    factory.stop_all()


@pytest.fixture(scope="session")
def client(server) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
        yield http


@pytest.fixture(scope="session")
def offline_llm(chat_checkpoint):
    """The offline engine on the same checkpoint and limits, for expected outputs."""
    from metroline.engine import LLM

    return LLM(model=str(chat_checkpoint), max_model_len=MAX_MODEL_LEN, kv_cache_memory_bytes=2**22)


def metric_value(text: str, name: str, labels: str = f'model_name="{MODEL_NAME}"') -> float:
    """The value of ``name{labels}`` in Prometheus text."""
    prefix = f"{name}{{{labels}}} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    raise KeyError(f"{prefix!r} not in metrics")
