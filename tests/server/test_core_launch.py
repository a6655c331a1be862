"""The engine core starts loading its model while the API server loads the tokenizer
(engine/server/state.py): a core launched and then abandoned exits at once, and a tokenizer
that fails to load fails the start, the core it launched with it."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import time

from metroline.engine.client.core_client import CoreClient
from metroline.engine.config import EngineArgs

from .test_lifecycle import ARGS, alive, wait_for


def test_an_abandoned_core_exits(tiny_checkpoint):
    config = EngineArgs(model=str(tiny_checkpoint("llama")), device="cpu").create_config()
    core = CoreClient(config)
    core.launch()
    core.launch()  # idempotent: one process
    process = core.process
    assert process is not None and process.is_alive()
    core.abandon()
    process.join(120)
    assert process.exitcode is not None, "the abandoned core is still running"


def test_shutting_down_a_core_that_never_started_closes_it(tiny_checkpoint):
    """No sender thread runs before start(): shutdown closes the pipes and the core exits
    by itself (it is not killed)."""
    config = EngineArgs(model=str(tiny_checkpoint("llama")), device="cpu").create_config()
    core = CoreClient(config)
    core.launch()
    asyncio.run(core.shutdown(120))
    assert core.process.exitcode is not None and core.process.exitcode != -signal.SIGKILL


def test_a_tokenizer_that_fails_to_load_fails_the_start(start_server, chat_checkpoint, tmp_path):
    broken = tmp_path / "broken-tokenizer"
    shutil.copytree(chat_checkpoint, broken)
    (broken / "tokenizer.json").write_text("{ not json")
    server = start_server(broken, *ARGS, wait=False)
    core = None
    deadline = time.monotonic() + 120
    while server.process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(RuntimeError, OSError):  # not spawned yet, or gone
            core = core or server.core_pid()
        time.sleep(0.02)
    assert server.process.wait(60) != 0
    assert "engine core is dead" in server.log()
    if core is not None:  # seen alive beside the tokenizer load: it went down too
        wait_for(lambda: not alive(core), 30, "the launched engine core to exit")
