"""The engine core process: the scheduler and the model, fed over pipes by the API server.

Messages are small picklable dataclasses sent over two one-way ``multiprocessing`` pipes (no
ports, no shared-memory names, so servers on one machine never collide). The loop:

1. when no request is unfinished, block until a message arrives;
2. drain every waiting message (add, abort, finish, shutdown) without blocking;
3. run one engine step if there is work;
4. send one :class:`CoreStep` with the step's outputs and fresh :class:`SchedulerStats`.

Invariants: a request that the core cannot take (``ValueError`` or anything else raised by
``add_request``) comes back as :class:`CoreStep.rejected` for that request alone and leaves
the core unchanged; an exception that escapes a step (one the step could not pin on a single
request) is fatal (reported as :class:`CoreFailed`, exit 1); the process ends when its parent
does, however the parent ends (see :mod:`metroline.engine.children`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection

from ..config import EngineConfig
from ..long_lived_heap import freeze_long_lived_heap
from ..messages import (
    AddRequests,
    CoreFailed,
    CoreReady,
    CoreStep,
    EngineCoreOutput,
    FinishRequests,
    Shutdown,
)

logger = logging.getLogger(__name__)

# ---- server -> core --------------------------------------------------------------------


# ---- core -> server --------------------------------------------------------------------


def run_engine_core(
    config: EngineConfig,
    log_setup: Callable[[], None] | None,
    inputs: Connection,
    outputs: Connection,
) -> None:
    """Process entry point (started by :func:`~metroline.engine.children.spawn_child`).
    ``log_setup`` (picklable, e.g. a ``functools.partial``) configures logging like the
    server's; ``None``: basicConfig."""
    # Ctrl-C in a terminal and group-wide SIGTERMs go to the server, which drains and then
    # stops us in order; the core never leaves on a signal of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if log_setup is not None:
        log_setup()
    else:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    from .engine_core import EngineCore

    try:
        core = EngineCore(config)
    except BaseException as error:  # every failure must reach the server
        logger.exception("engine core failed to start")
        with contextlib.suppress(OSError):
            outputs.send(CoreFailed(f"{type(error).__name__}: {error}"))
        raise SystemExit(1) from None
    # The model, the block pool and the graphs live as long as the process.
    freeze_long_lived_heap()
    code = 0
    try:
        outputs.send(CoreReady(core.num_blocks))
        logger.info("engine core ready: %d KV blocks", core.num_blocks)
        CoreLoop(core, inputs, outputs).run()
    except BaseException:
        message = traceback.format_exc()
        logger.error("engine core failed:\n%s", message)
        with contextlib.suppress(OSError):
            outputs.send(CoreFailed(message.strip().splitlines()[-1]))
        code = 1
    try:
        core.shutdown()
    except BaseException:
        logger.exception("engine core shutdown failed")
        code = 1
    # Everything this process owes the server went out through the pipe synchronously. The
    # interpreter's own teardown of a CUDA process (graphs, pools, context) can outlast the
    # server's patience (docs/engine.md, "Shutdown"); it frees nothing the OS does not free,
    # so the process leaves without it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class CoreLoop:
    """Drives one :class:`EngineCore` from messages; see the module docstring."""

    def __init__(self, core, inputs: Connection, outputs: Connection) -> None:
        self.core = core
        self.inputs = inputs
        self.outputs = outputs
        #: Core request ids that have been scheduled at least once and not yet finished.
        self.seen_scheduled: set[str] = set()

    def run(self) -> None:
        self.outputs.send(CoreStep([], self.core.stats()))  # gauges start at the real values
        while True:
            if not self.core.has_unfinished_requests():
                self.inputs.poll(None)  # idle: sleep until a message (or EOF) arrives
            rejected: list[tuple[str, str]] = []
            if not self._drain_inputs(rejected):
                return
            step_start = time.monotonic()
            step_outputs = self.core.step() if self.core.has_unfinished_requests() else []
            scheduled = self._newly_scheduled(step_start, step_outputs)
            self.outputs.send(CoreStep(step_outputs, self.core.stats(), scheduled, rejected))

    def _drain_inputs(self, rejected: list[tuple[str, str]]) -> bool:
        """Apply every waiting message; False on shutdown or when the server is gone."""
        while self.inputs.poll(0):
            try:
                message = self.inputs.recv()
            except EOFError:
                return False
            if isinstance(message, AddRequests):
                self._add(message, rejected)
            elif isinstance(message, FinishRequests):
                self.core.finish_requests(message.core_request_ids, message.status)
                self.seen_scheduled.difference_update(message.core_request_ids)
            elif isinstance(message, Shutdown):
                return False
            else:
                logger.error("unknown message %r ignored", type(message).__name__)
        return True

    def _add(self, message: AddRequests, rejected: list[tuple[str, str]]) -> None:
        added: list[str] = []
        try:
            for core_request in message.core_requests:
                self.core.add_request(core_request)
                added.append(core_request.request_id)
        except Exception as error:  # one bad request must not end the core
            self.core.finish_requests(added)
            rejected.append((message.request_id, str(error) or type(error).__name__))

    def _newly_scheduled(self, step_start: float, step_outputs: list[EngineCoreOutput]):
        scheduled: dict[str, float] = {}
        for request_id in self.core.running_request_ids():
            if request_id not in self.seen_scheduled:
                self.seen_scheduled.add(request_id)
                scheduled[request_id] = step_start
        for output in step_outputs:
            if output.request_id not in self.seen_scheduled and output.finished:
                scheduled[output.request_id] = step_start
            if output.finished:
                self.seen_scheduled.discard(output.request_id)
        return scheduled
