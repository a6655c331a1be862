"""The reconcile loop: watch events in, applied children and truthful status out.

Kopf's event handlers feed ``ClusterCache`` and enqueue the owning LLMDeployment; workers take
keys from a deduplicating ``WorkQueue`` (one worker per key at a time) and run ``reconcile``:
judge the spec, server-side apply the children that are missing or drifted, delete a PDB that is
no longer wanted, then patch ``status`` only if it changed. Each child the operator creates,
updates or deletes and each condition change is also recorded as a Kubernetes Event, handed to
``EventRecorder`` (its own task: an Event never delays or fails a reconcile). Failures are
retried with exponential backoff per key (``Retry-After`` honoured); a spec the API server
refuses (422) becomes InvalidSpec and waits for the next spec change instead of retrying.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Callable, Mapping
from typing import Any

from .cache import ClusterCache, Key
from .checks import SpecCheck, check_spec
from .config import OperatorConfig
from .drift import covers
from .events import EventNote, condition_events
from .kube import ApiError, KubeClient
from .kvmetrics import KvScraper
from .podhealth import is_ready
from .recorder import EventRecorder
from .render import render_children, wants_pdb
from .status import Observed, compute_status, status_changed
from .workqueue import WorkQueue

logger = logging.getLogger(__name__)


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Controller:
    def __init__(
        self, client: KubeClient, config: OperatorConfig, clock: Callable[[], str] = utc_now
    ) -> None:
        self.client, self.config, self.clock = client, config, clock
        self.cache = ClusterCache()
        self.scraper = KvScraper(port=config.metrics_port)
        self.events = EventRecorder(client, clock, config.instance)
        self.kv: dict[Key, float | None] = {}
        self.failures: dict[Key, int] = {}
        self.refused: dict[Key, tuple[int, SpecCheck]] = {}
        """Generations whose children the API server refused (422): not retried until edited."""
        self._queue: WorkQueue[Key] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # Event intake (called from kopf handlers; never blocks, never raises on odd objects).
    def _enqueue(self, key: Key | None) -> None:
        if key is not None and self._queue is not None:
            self._queue.add(key)

    def on_llmd(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if event_type == "DELETED":
            self.cache.drop_llmd(key)
            self.kv.pop(key, None)
            self.failures.pop(key, None)
            self.refused.pop(key, None)
            if self._queue is not None:
                self._queue.forget(key)
            return
        self.cache.put_llmd(body)
        self._enqueue(key)

    def on_child(self, kind: str, event_type: str | None, body: Mapping[str, Any]) -> None:
        self._enqueue(self.cache.put_child(body, kind, deleted=event_type == "DELETED"))

    def on_pod(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        self._enqueue(self.cache.put_pod(body, deleted=event_type == "DELETED"))

    # Lifecycle.
    async def start(self) -> None:
        self._queue = WorkQueue()
        for key in self.cache.llmd_keys():
            self._queue.add(key)
        self.events.start()
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.config.workers)]
        self._tasks.append(asyncio.create_task(self._kv_loop()))

    async def stop(self) -> None:
        if self._queue is not None:
            self._queue.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.events.stop()
        await self.scraper.close()
        await self.client.close()

    async def _worker(self) -> None:
        assert self._queue is not None
        while True:
            key = await self._queue.get()
            try:
                await self.reconcile(key)
                self.failures.pop(key, None)
            except Exception as error:
                failures = self.failures[key] = self.failures.get(key, 0) + 1
                delay = self.config.backoff.delay(failures)
                if isinstance(error, ApiError) and error.retry_after:
                    delay = max(delay, error.retry_after)
                level = logging.INFO if isinstance(error, ApiError) else logging.ERROR
                logger.log(level, "reconcile %s/%s failed (%d in a row), retry in %.1fs: %s",
                           *key, failures, delay, error, exc_info=level == logging.ERROR)
                self._queue.add_after(key, delay)
            finally:
                self._queue.done(key)

    async def _kv_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.kv_interval_s)
            await self.sample_kv()

    async def sample_kv(self) -> None:
        """Refresh the KV averages; wake the LLMDeployments whose rounded value changed."""
        keys = self.cache.llmd_keys()
        ready = {key: [p for p in self.cache.pods(key) if is_ready(p)] for key in keys}
        values = await asyncio.gather(
            *(self.scraper.average(ready[key]) if ready[key] else _none() for key in keys)
        )
        for key, value in zip(keys, values):
            rounded = None if value is None else round(value, 2)
            if self.kv.get(key) != rounded:
                self.kv[key] = rounded
                self._enqueue(key)

    # Reconciliation.
    async def reconcile(self, key: Key) -> None:
        body = self.cache.llmd(key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        namespace, name = key
        generation = int(body["metadata"].get("generation") or 1)
        check = check_spec(name, body.get("spec"))
        refused = self.refused.get(key)
        if check.valid and refused is not None and refused[0] == generation:
            check = refused[1]
        elif check.valid:
            check = await self._apply_children(key, body, check)
            if not check.valid:
                self.refused[key] = (generation, check)
        if not check.valid:
            logger.info("%s/%s has an invalid spec: %s", namespace, name, "; ".join(check.problems))
        observed = Observed(
            deployment=self.cache.child(key, "Deployment"),
            pods=self.cache.pods(key),
            kv_cache_utilization=self.kv.get(key),
        )
        current = body.get("status") or {}
        status = compute_status(name, namespace, generation, check, observed, current, self.clock())
        if status_changed(current, status):
            try:
                self.cache.put_llmd(await self.client.patch_status(namespace, name, status))
            except ApiError as error:
                if error.status != 404:  # 404: deleted meanwhile, nothing to report on
                    raise
                return
            for note in condition_events(current, status):
                self.events.record(body, note)

    async def _apply_children(
        self, key: Key, body: Mapping[str, Any], check: SpecCheck
    ) -> SpecCheck:
        for desired in render_children(body, check, self.config.engine_image):
            live = self.cache.child(key, desired["kind"])
            if live is not None and covers(desired, live):
                continue
            try:
                applied, created = await self.client.apply(desired)
            except ApiError as error:
                if error.status in (400, 422):
                    problem = f"the API server refused the {desired['kind']}: {error.message}"
                    return SpecCheck(None, None, (problem,))
                raise
            logger.info("applied %s %s/%s", desired["kind"], *key)
            self.cache.put_child(applied, desired["kind"])
            # Not in the cache and not created: it existed (the cache is still filling after a
            # restart); re-applying it changed nothing worth an Event.
            if created or live is not None:
                verb = "Created" if created else "Updated"
                what = f"{desired['kind']} {desired['metadata']['name']}"
                self.events.record(body, EventNote("Normal", verb, f"{verb.lower()} {what}"))
        if not wants_pdb(check) and self.cache.child(key, "PodDisruptionBudget") is not None:
            await self.client.delete("policy/v1", "PodDisruptionBudget", *key)
            self.cache.put_child(
                self.cache.child(key, "PodDisruptionBudget") or {}, "PodDisruptionBudget",
                deleted=True,
            )
            logger.info("deleted PodDisruptionBudget %s/%s (replicas < 2)", *key)
            why = f"deleted PodDisruptionBudget {key[1]} (replicas < 2)"
            self.events.record(body, EventNote("Normal", "Deleted", why))
        return check


async def _none() -> None:
    return None
