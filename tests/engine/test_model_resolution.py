"""Models by name: a Hugging Face id resolves from a cache folder written here (the hub's
``models--org--name/snapshots/<commit>`` + ``refs/<branch>`` layout, HF_HUB_OFFLINE=1) and
serves; ``--revision`` picks a branch or a commit; a local directory wins; unknown ids and
revisions, and ``.bin``-only checkpoints, are clear errors."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from metroline.engine import LLM, SamplingParams
from metroline.engine.config import EngineArgs
from metroline.engine.model_resolution import hub_cache_dir, resolve_model_path

REPO = "tiny-org/tiny-qwen3"
MAIN = hashlib.sha1(b"main").hexdigest()
V2 = hashlib.sha1(b"v2").hexdigest()


def write_hub_cache(cache: Path, repo: str, snapshots: dict[str, Path], refs: dict[str, str]):
    """The layout huggingface_hub writes: files in ``blobs/<sha256>``, each snapshot a folder
    of links to them, each ref a file holding a commit."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    for commit, source in snapshots.items():
        snapshot = folder / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for file in sorted(source.iterdir()):
            digest = hashlib.sha256(file.read_bytes()).hexdigest()
            blob = folder / "blobs" / digest
            blob.parent.mkdir(exist_ok=True)
            if not blob.exists():
                shutil.copyfile(file, blob)
            (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (folder / "refs").mkdir(exist_ok=True)
    for name, commit in refs.items():
        (folder / "refs" / name).write_text(commit)
    return folder


@pytest.fixture(scope="module")
def hub_cache(tiny_checkpoint, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hf-home") / "hub"
    snapshots = {MAIN: tiny_checkpoint("qwen3"), V2: tiny_checkpoint("qwen3", seed=1)}
    write_hub_cache(cache, REPO, snapshots, {"main": MAIN, "v2": V2})
    return cache


@pytest.fixture
def offline_cache(hub_cache, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub_cache


def _snapshot(cache: Path, commit: str) -> Path:
    return cache / ("models--" + REPO.replace("/", "--")) / "snapshots" / commit


def test_served_by_id_from_the_cache(offline_cache, tiny_checkpoint, tmp_path):
    """``metroline serve org/name``, as a user runs it, answers as the same weights do."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("METROLINE_API_KEY", None)
    port = _free_port()
    log = (tmp_path / "server.log").open("wb")
    command = [
        sys.executable, "-P", "-m", "metroline.engine.cli", "serve", REPO, "--host",
        "127.0.0.1", "--port", str(port), "--max-model-len", "64",
        "--kv-cache-memory-bytes", str(2**21), "--disable-uvicorn-access-log",
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(server, url, tmp_path / "server.log")
        models = httpx.get(f"{url}/v1/models", timeout=30).json()
        assert [card["id"] for card in models["data"]] == [REPO]
        body = {"model": REPO, "prompt": "def wrap(text):", "max_tokens": 8, "temperature": 0}
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
    finally:
        server.terminate()
        server.wait(30)
        log.close()
    local = LLM(model=str(tiny_checkpoint("qwen3")), max_model_len=64, kv_cache_memory_bytes=2**21)
    params = SamplingParams(temperature=0, max_tokens=8)
    expected = local.generate(["def wrap(text):"], params, use_tqdm=False)[0].outputs[0].text
    assert answer["choices"][0]["text"] == expected


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(server: subprocess.Popen, url: str, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server not ready after {timeout} s:\n{log.read_text()}")


def test_revision_by_branch_or_commit(offline_cache):
    assert resolve_model_path(REPO) == _snapshot(offline_cache, MAIN)
    assert resolve_model_path(REPO, "main") == _snapshot(offline_cache, MAIN)
    assert resolve_model_path(REPO, "v2") == _snapshot(offline_cache, V2)
    assert resolve_model_path(REPO, V2) == _snapshot(offline_cache, V2)
    config = EngineArgs(model=REPO, revision="v2", device="cpu").create_config()
    assert config.model.path == _snapshot(offline_cache, V2)
    assert config.model.has_tokenizer


def test_cache_folder_from_the_environment(monkeypatch, tmp_path):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub_cache_dir() == tmp_path / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub_cache_dir() == tmp_path / "cache"


def test_unknown_id_or_revision_is_a_clear_error(offline_cache):
    folder = offline_cache / "models--tiny-org--tiny-qwen3"
    with pytest.raises(ValueError) as error:
        resolve_model_path(REPO, "no-such-branch")
    message = str(error.value)
    assert f"model {REPO!r}" in message and "revision 'no-such-branch'" in message
    assert f"searched {folder}" in message
    assert f"(cached: refs main, v2; snapshots {', '.join(sorted([MAIN, V2]))})" in message
    assert "HF_HUB_OFFLINE is set" in message
    with pytest.raises(ValueError, match=r"revision 'main': searched .*models--tiny-org--nope"):
        resolve_model_path("tiny-org/nope")
    with pytest.raises(ValueError, match=r"without '\.\.' segments"):
        resolve_model_path(REPO, "../../etc")
    with pytest.raises(ValueError, match="local checkpoint directory or a Hugging Face model id"):
        resolve_model_path("/no/such/directory")


def test_unknown_id_exits_2_with_the_message(offline_cache):
    result = subprocess.run(
        [sys.executable, "-P", "-m", "metroline.engine.cli", "serve", "tiny-org/nope",
         "--revision", "v9"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "'tiny-org/nope'" in result.stderr and "revision 'v9'" in result.stderr
    assert str(offline_cache) in result.stderr
    assert "Traceback" not in result.stderr


def test_local_directory_wins(offline_cache, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_checkpoint("llama"), tmp_path / REPO)
    assert resolve_model_path(REPO) == Path(REPO)
    with pytest.raises(ValueError, match="applies to a Hugging Face model id"):
        resolve_model_path(REPO, "v2")


def test_bin_only_checkpoint_asks_for_safetensors(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file

    from metroline.engine.models.loader import checkpoint_files

    source = tiny_checkpoint("qwen3")
    target = tmp_path / "bin-only"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(str(source / "model.safetensors")), target / "pytorch_model.bin")
    with pytest.raises(ValueError) as error:
        LLM(model=str(target))
    message = str(error.value)
    assert message.startswith("safetensors required") and "pytorch_model.bin" in message
    assert "dummy" not in message
    with pytest.raises(ValueError, match="safetensors required"):
        checkpoint_files(target)
