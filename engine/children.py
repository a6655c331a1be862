"""Child processes that must not outlive their parent (the engine core, TP workers).

:func:`spawn_child` starts ``"package.module:function"`` in a fresh interpreter (the
``spawn`` start method) with two one-way pipes, one each way, and a death pipe. The parent
never imports the target's module: the child resolves the name itself, so a process that
only starts the engine core (the API server) never loads the core's or the workers' code.

Invariants, once :func:`spawn_child` returns: only the child holds the child's pipe ends, so
the kernel closes them however the child ends (the parent's reads then raise ``EOFError``);
only the parent holds the write end of the death pipe, which it never writes, so the kernel
closes it however the parent ends (normal exit, exception, SIGTERM, SIGKILL) and the child
exits at once.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any


@dataclass
class Child:
    """The parent's handle: the process, the pipe ends it keeps, and the death pipe."""

    process: BaseProcess
    #: Parent -> child messages.
    to_child: Connection
    #: Child -> parent messages.
    from_child: Connection
    death_writer: Connection

    def close_pipes(self) -> None:
        """Close the parent's ends (the child, if still alive, then sees EOF and exits)."""
        for end in (self.to_child, self.from_child, self.death_writer):
            end.close()


def spawn_child(target: str, args: tuple[Any, ...], name: str, daemon: bool = False) -> Child:
    """Start ``target(*args, inputs, outputs)`` in a new process, where ``inputs`` reads
    what the parent sends on :attr:`Child.to_child` and ``outputs`` writes what the parent
    reads from :attr:`Child.from_child`."""
    # The child starts as ``python -c ...``, which would put the working directory first
    # on sys.path; in a checkout, the folder operator/ must never shadow the stdlib.
    os.environ.setdefault("PYTHONSAFEPATH", "1")
    context = multiprocessing.get_context("spawn")
    inputs, to_child = context.Pipe(duplex=False)
    from_child, outputs = context.Pipe(duplex=False)
    death_reader, death_writer = context.Pipe(duplex=False)
    process = context.Process(
        target=_child_main,
        args=(target, args, inputs, outputs, death_reader),
        name=name,
        daemon=daemon,
    )
    process.start()
    for end in (inputs, outputs, death_reader):
        end.close()  # the child holds these now; our copies would hide its death
    return Child(process, to_child, from_child, death_writer)


def _child_main(
    target: str,
    args: tuple[Any, ...],
    inputs: Connection,
    outputs: Connection,
    death_pipe: Connection,
) -> None:
    die_with_parent(death_pipe)
    module_name, function_name = target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    function(*args, inputs, outputs)


def die_with_parent(death_pipe: Connection) -> None:
    """Exit at once when the parent is gone.

    ``death_pipe`` is the read end of a pipe whose write end only the parent holds and never
    writes; the kernel closes it however the parent ends, so the read returns and this
    process leaves without cleanup that could hang.
    """

    def watch() -> None:
        with contextlib.suppress(EOFError, OSError):
            death_pipe.recv_bytes()
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
