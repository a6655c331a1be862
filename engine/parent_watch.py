"""Child processes that must not outlive their parent (engine core, TP workers)."""

from __future__ import annotations

import contextlib
import os
import threading
from multiprocessing.connection import Connection


def die_with_parent(death_pipe: Connection) -> None:
    """Exit at once when the parent is gone.

    ``death_pipe`` is the read end of a pipe whose write end only the parent holds and never
    writes; the kernel closes it however the parent ends (normal exit, exception, SIGTERM,
    SIGKILL), so the read returns and this process leaves without cleanup that could hang.
    """

    def watch() -> None:
        with contextlib.suppress(EOFError, OSError):
            death_pipe.recv_bytes()
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
