"""The server side of the engine core process: start it, send to it, hear from it.

Two daemon threads move messages: a sender drains an outbox into the core's input pipe (so
the event loop never blocks on a full pipe), and a reader hands every message from the core
to the event loop with ``call_soon_threadsafe``. When the core's output pipe closes (the core
exited, crashed, or was killed), ``on_gone(reason)`` is called on the event loop once.

The core is started with :func:`~metroline.engine.children.spawn_child`: it notices
however this process ends, and this process sees its pipe close however the core ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import queue
import threading
from collections.abc import Callable
from typing import Any

from ..children import Child, spawn_child
from ..config import EngineConfig
from ..messages import CoreFailed, Shutdown

logger = logging.getLogger(__name__)

#: The engine core process's entry, named so that this process never imports the core.
CORE_ENTRY = "metroline.engine.core.process:run_engine_core"


class CoreClient:
    def __init__(self, config: EngineConfig, log_setup: Callable[[], None] | None = None) -> None:
        self.config = config
        self.log_setup = log_setup
        self.process: multiprocessing.process.BaseProcess | None = None
        self.closing = False
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._child: Child | None = None
        self._started = False  # the sender and reader threads run

    def launch(self) -> None:
        """Spawn the core now, so its model loads while this process does other start-up
        work; idempotent. Until :meth:`start` attaches the threads, what the core sends
        waits in its pipe (before its model is ready it sends one message at most)."""
        if self._child is None:
            self._child = spawn_child(
                CORE_ENTRY, (self.config, self.log_setup), name="metroline-engine-core"
            )
            self.process = self._child.process

    def abandon(self) -> None:
        """Drop a core that was launched but never started: closing our pipe ends (the
        death pipe among them) makes it exit at once."""
        if self._child is not None and not self.closing:
            self.closing = True
            self._child.close_pipes()

    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[Any], None],
        on_gone: Callable[[str], None],
    ) -> None:
        self.launch()
        assert self._child is not None
        self._started = True
        threading.Thread(
            target=self._send_loop, args=(self._child.to_child,), name="core-sender", daemon=True
        ).start()
        threading.Thread(
            target=self._read_loop,
            args=(self._child.from_child, loop, on_message, on_gone),
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
        if self._started:
            self.closing = True
            self._outbox.put(Shutdown())
            self._outbox.put(None)
        else:  # no sender to carry a Shutdown: closing the pipes stops the core
            self.abandon()
        process = self.process
        await asyncio.to_thread(process.join, timeout)
        if process.is_alive():
            logger.warning("engine core did not stop in %.0f s; killing it", timeout)
            process.kill()
            await asyncio.to_thread(process.join, 5)
        self._child.death_writer.close()

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
