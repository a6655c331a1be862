"""Logs that stay bounded when something fails in bulk: a flood of one kind of error (asyncio's
accept loop logs one traceback per failed ``accept()``; uvicorn one warning per bad
connection) becomes one full entry and one summary line per window."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Repeats:
    window_start: float
    suppressed: int = 0


class RepeatLimiter:
    """Keeps a flood of one kind of event to one full log entry and one summary per window.

    :meth:`admit` says whether to log an occurrence in full: the first of its kind (``key``)
    is; later ones within ``window`` seconds are only counted, and :meth:`flush` reports
    each count on one line once its window has ended. A kind quiet for a whole window is
    forgotten (its next occurrence is logged in full again). At most ``max_kinds`` kinds are
    tracked; further ones share one key, so the log stays bounded whatever the keys.
    """

    OTHER = "(other kinds)"

    def __init__(
        self,
        report: Callable[[str, int, float], None],
        window: float = 10.0,
        max_kinds: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.report = report
        self.window = window
        self.max_kinds = max_kinds
        self.clock = clock
        self._kinds: dict[str, _Repeats] = {}

    def admit(self, key: str) -> bool:
        """True: log this occurrence in full; False: it was counted for a summary."""
        now = self.clock()
        if key not in self._kinds and len(self._kinds) >= self.max_kinds:
            key = self.OTHER
        repeats = self._kinds.get(key)
        if repeats is not None and now - repeats.window_start >= self.window:
            self._end_window(key, repeats, now)
            repeats = self._kinds.get(key)
        if repeats is None:
            self._kinds[key] = _Repeats(window_start=now)
            return True
        repeats.suppressed += 1
        return False

    def flush(self, everything: bool = False) -> None:
        """Report (and restart) every window that has ended, or every window at all
        (``everything``, at exit); forget quiet kinds."""
        now = self.clock()
        for key, repeats in list(self._kinds.items()):
            if everything or now - repeats.window_start >= self.window:
                self._end_window(key, repeats, now)

    def _end_window(self, key: str, repeats: _Repeats, now: float) -> None:
        if repeats.suppressed == 0:
            del self._kinds[key]
            return
        self.report(key, repeats.suppressed, now - repeats.window_start)
        self._kinds[key] = _Repeats(window_start=now)


def report_repeats(key: str, count: int, seconds: float) -> None:
    logger.warning("%d more of %r in the last %.0f s (not logged one by one)", count, key, seconds)


class LoopErrorHandler:
    """An asyncio exception handler that logs each kind of error (its message and exception
    type) through a :class:`RepeatLimiter`, in asyncio's own format."""

    def __init__(self, limiter: RepeatLimiter) -> None:
        self.limiter = limiter

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        key = _kind("asyncio", context.get("message"), context.get("exception"))
        if self.limiter.admit(key):
            loop.default_exception_handler(context)


class RepeatFilter(logging.Filter):
    """A logger filter: records at WARNING and above pass through a :class:`RepeatLimiter`,
    keyed by logger, message template and exception type (uvicorn logs one warning per bad
    connection, e.g. "Invalid HTTP request received.")."""

    def __init__(self, limiter: RepeatLimiter) -> None:
        super().__init__()
        self.limiter = limiter

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        exception = record.exc_info[1] if record.exc_info else None
        return self.limiter.admit(_kind(record.name, record.msg, exception))


def _kind(source: str, message: object, exception: BaseException | None) -> str:
    """The key of a kind of error: where it was logged, what it says, and its exception."""
    key = f"{source}: {message}"
    return key if exception is None else f"{key} ({type(exception).__name__})"
