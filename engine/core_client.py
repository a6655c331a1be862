"""The server side of the engine core process: start it, send to it, hear from it.

Two daemon threads move messages: a sender drains an outbox into the core's input pipe (so
the event loop never blocks on a full pipe), and a reader hands every message from the core
to the event loop with ``call_soon_threadsafe``. When the core's output pipe closes (the core
exited, crashed, or was killed), ``on_gone(reason)`` is called on the event loop once.

Invariant: after :meth:`CoreClient.start` returns, only the child holds the child's pipe
ends, so the kernel closes them however the child ends; the child holds the read end of a
"death pipe" whose write end only we hold, so it notices however we end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

from metroline.engine.config import EngineConfig
from metroline.engine.core_process import CoreFailed, Shutdown, run_engine_core

logger = logging.getLogger(__name__)


class CoreClient:
    def __init__(self, config: EngineConfig, log_setup: Callable[[], None] | None = None) -> None:
        self.config = config
        self.log_setup = log_setup
        self.process: multiprocessing.process.BaseProcess | None = None
        self.closing = False
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._death_writer = None

    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[Any], None],
        on_gone: Callable[[str], None],
    ) -> None:
        # The child starts as ``python -c ...``, which would put the working directory first
        # on sys.path; in a checkout, the folder operator/ must never shadow the stdlib.
        os.environ.setdefault("PYTHONSAFEPATH", "1")
        context = multiprocessing.get_context("spawn")
        inputs_reader, inputs_writer = context.Pipe(duplex=False)
        outputs_reader, outputs_writer = context.Pipe(duplex=False)
        death_reader, self._death_writer = context.Pipe(duplex=False)
        self.process = context.Process(
            target=run_engine_core,
            args=(self.config, inputs_reader, outputs_writer, death_reader, self.log_setup),
            name="metroline-engine-core",
        )
        self.process.start()
        for end in (inputs_reader, outputs_writer, death_reader):
            end.close()  # the child holds these now; our copies would hide its death
        threading.Thread(
            target=self._send_loop, args=(inputs_writer,), name="core-sender", daemon=True
        ).start()
        threading.Thread(
            target=self._read_loop,
            args=(outputs_reader, loop, on_message, on_gone),
            name="core-reader",
            daemon=True,
        ).start()

    def send(self, message: Any) -> None:
        """Queue a message for the core (never blocks)."""
        self._outbox.put(message)

    async def shutdown(self, timeout: float) -> None:
        """Ask the core to stop, wait up to ``timeout``, then kill it; idempotent."""
        if self.process is None or self.closing:
            return
        self.closing = True
        self._outbox.put(Shutdown())
        self._outbox.put(None)
        process = self.process
        await asyncio.to_thread(process.join, timeout)
        if process.is_alive():
            logger.warning("engine core did not stop in %.0f s; killing it", timeout)
            process.kill()
            await asyncio.to_thread(process.join, 5)
        self._death_writer.close()

    def _send_loop(self, connection) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                connection.send(message)
            except OSError:
                break  # the core is gone; the reader thread reports it
        connection.close()

    def _read_loop(self, connection, loop, on_message, on_gone) -> None:
        reason = "the engine core process exited"
        while True:
            try:
                message = connection.recv()
            except (EOFError, OSError):
                break
            if isinstance(message, CoreFailed):
                reason = f"the engine core failed: {message.message}"
            with contextlib.suppress(RuntimeError):  # the loop may be closed at exit
                loop.call_soon_threadsafe(on_message, message)
        if self.process is not None:
            self.process.join(5)
            if self.process.exitcode is not None and self.process.exitcode < 0:
                reason += f" (killed by signal {-self.process.exitcode})"
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(on_gone, reason)
