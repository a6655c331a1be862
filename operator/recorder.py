"""Writes Events off the reconcile path, repeats folded into one Event as client-go does.

``record`` never blocks and never raises: it puts the note on a bounded queue (a full queue
drops it, logged) that one background task drains in order. Each write has its own short
timeout and any failure is logged and dropped, so a slow or refusing events API delays and
fails nothing else. An Event with the same involved object, type, reason and message as one
written in the last ``window_s`` seconds is not written again: the earlier one's ``count`` goes
up and its ``lastTimestamp`` moves (a crash loop shows as one Event seen N times, not N Events).
Writes go through ``EventWrites`` and so through the controller's leadership gate: a replica
that lost the Lease drops what it still had queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .events import EventNote, event_body
from .kube import ApiError, KubeClient
from .leader import NotLeader

logger = logging.getLogger(__name__)

_Key = tuple[str, str, str, str, str]  # namespace, owner uid or name, type, reason, message


class EventWrites:
    """The Event calls of ``client``, each through ``api`` (the controller's: it refuses writes
    unless this replica leads, and counts failures)."""

    def __init__(
        self, client: KubeClient, api: Callable[[Awaitable[Any]], Awaitable[Any]]
    ) -> None:
        self.client, self.api = client, api

    async def create_event(self, event: Mapping[str, Any]) -> dict[str, Any]:
        return await self.api(self.client.create_event(event))

    async def patch_event(
        self, namespace: str, name: str, patch: Mapping[str, Any]
    ) -> dict[str, Any]:
        return await self.api(self.client.patch_event(namespace, name, patch))


@dataclass
class _Written:
    name: str
    count: int
    last: float  # monotonic seconds of the latest occurrence


class EventRecorder:
    def __init__(
        self, client: KubeClient | EventWrites, clock: Callable[[], str], instance: str, *,
        queue_size: int = 256, timeout_s: float = 5.0, window_s: float = 600.0,
        remember: int = 4096, monotonic: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.client, self.clock, self.instance = client, clock, instance
        self.queue_size, self.timeout_s, self.window_s = queue_size, timeout_s, window_s
        self.remember, self.monotonic = remember, monotonic
        self._written: OrderedDict[_Key, _Written] = OrderedDict()
        self._queue: asyncio.Queue[tuple[Mapping[str, Any], EventNote]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._sequence = itertools.count()
        self.dropped = 0

    def start(self) -> None:
        self._queue = asyncio.Queue(self.queue_size)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = self._queue = None

    def record(self, llmd: Mapping[str, Any], note: EventNote) -> None:
        """Queue an Event about LLMDeployment ``llmd``; returns at once."""
        if self._queue is None:
            return
        try:
            self._queue.put_nowait((llmd, note))
        except asyncio.QueueFull:
            self.dropped += 1
            logger.warning("event queue full, dropped %s %s for %s", note.type, note.reason,
                           llmd["metadata"]["name"])  # fmt: skip

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            llmd, note = await self._queue.get()
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancel
                # that arrives as the write finishes, and the writer would never stop.
                async with asyncio.timeout(self.timeout_s):
                    await self._write(llmd, note)
            except NotLeader:  # the Lease was lost: the new leader writes what it sees
                logger.debug("not leading: dropped event %s", note.reason)
            except Exception as error:  # an Event is never worth failing anything for
                meta = llmd["metadata"]
                logger.info("could not record event %s for %s/%s: %s",
                            note.reason, meta["namespace"], meta["name"], error)  # fmt: skip
            finally:
                self._queue.task_done()

    async def idle(self) -> None:
        """Wait until every queued Event has been written or dropped."""
        if self._queue is not None:
            await self._queue.join()

    async def _write(self, llmd: Mapping[str, Any], note: EventNote) -> None:
        meta = llmd["metadata"]
        namespace = meta["namespace"]
        key = (namespace, meta.get("uid") or meta["name"], note.type, note.reason, note.message)
        now, seen = self.monotonic(), self._written.get(key)
        if seen is not None and now - seen.last <= self.window_s:
            try:
                await self.client.patch_event(
                    namespace, seen.name, {"count": seen.count + 1, "lastTimestamp": self.clock()}
                )
                seen.count, seen.last = seen.count + 1, now
                self._written.move_to_end(key)
                return
            except ApiError as error:
                if error.status != 404:  # 404: expired (the API server keeps Events ~1 h)
                    raise
        suffix = f"{time.time_ns():x}{next(self._sequence) % 4096:03x}"
        event = event_body(llmd, note, self.clock(), self.instance, suffix)
        await self.client.create_event(event)
        self._written[key] = _Written(event["metadata"]["name"], 1, now)
        self._written.move_to_end(key)
        while len(self._written) > self.remember:
            self._written.popitem(last=False)
