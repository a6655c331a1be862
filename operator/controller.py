"""The reconcile loop: watch events in, applied children and truthful status out.

Kopf's event handlers feed ``ClusterCache`` and enqueue the owning LLMDeployment; workers take
keys from a deduplicating ``WorkQueue`` (one worker per key at a time) and run ``reconcile``:
judge the spec, server-side apply the children that are missing or drifted, delete those no
longer wanted (a PDB, an InferencePool), then patch ``status`` only if it changed. Each child
created, updated or deleted and each condition change is also recorded as a Kubernetes Event,
handed to ``EventRecorder`` (its own task: an Event never delays or fails a reconcile).

Every outcome of writing the children ends in ``status``, which is patched even when a write
failed: a spec the API server refuses as such (400, 422, or the 500 "field not declared in
schema" of server-side apply) is ``InvalidSpec`` and waits for the next spec change instead of
retrying; 403 (quota, admission webhooks, RBAC) is ``Forbidden`` and other failures (5xx,
timeouts, lost connections) ``ApplyFailed``, both retried with exponential backoff per key
(``Retry-After`` honoured). 409 and 429 (conflicts, throttling) are only retried: the server
asked for that, and status keeps what it said until the retry. Condition changes become Events,
so a failure is one Event, not one per retry.

With two replicas, only the holder of the Lease (``leader.py``) writes: every API write of the
controller and of the Event recorder goes through ``api``, which refuses it (``NotLeader``)
unless the elector says this replica leads; a standby keeps its cache (kopf still watches) but
queues nothing and scrapes no KV figures (so the autoscaler, ``scaler.py``, decides nothing).
On taking over it scrapes once, then queues every known LLMDeployment, so what changed while it
stood by is reconciled.

Each reconcile's outcome, its duration, the applies, the failed API calls, the KV scrapes that
gave nothing and the queue's depth are counted in ``metrics`` (``metrics.py``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from . import metrics as m
from .cache import ClusterCache, Key
from .checks import SpecCheck, check_spec
from .config import OperatorConfig
from .drift import covers
from .events import EventNote, condition_events
from .kube import ApiError, KubeClient
from .leader import LeaderElector, NotLeader
from .recorder import EventRecorder, EventWrites
from .render import render_children, unwanted_children
from .routing import InferencePools
from .scaler import Scaler
from .status import (
    APPLY_FAILED,
    FORBIDDEN,
    ApplyFailure,
    Observed,
    compute_status,
    status_changed,
)
from .workqueue import WorkQueue

T = TypeVar("T")
logger = logging.getLogger(__name__)


TRANSIENT_STATUSES = frozenset({409, 429})
"""Conflicts and throttling: retried (after ``Retry-After``) without a word in status."""
EVENTS_STOP_S = 2.0
"""How long ``stop`` waits for the Event writer to end (a bound, so a stuck events API cannot
hold the operator's exit)."""


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ChildWriteError(Exception):
    """Writing one child failed: ``verb`` (apply, delete) of ``kind``; the server's ``error``."""

    def __init__(self, verb: str, kind: str, error: ApiError) -> None:
        super().__init__(f"{verb} {kind}: {error}")
        self.verb, self.kind, self.error = verb, kind, error

    def problem(self) -> str:
        """The InvalidSpec message when the API server refused the request as such."""
        what = self.kind if self.verb == "apply" else f"{self.verb} of the {self.kind}"
        return f"the API server refused the {what}: {self.error.message}"

    def failure(self) -> ApplyFailure:
        """The status outcome of any other failure, in the API server's words."""
        error = self.error
        if error.status == 403:
            return ApplyFailure(FORBIDDEN, (
                f"the API server forbids the {self.verb} of the {self.kind}: {error.message}; "
                "retrying with backoff"
            ))
        answer = f"HTTP {error.status} {error.reason}" if error.status else error.reason
        return ApplyFailure(APPLY_FAILED, (
            f"could not {self.verb} the {self.kind} ({answer}): {error.message}; "
            "retrying with backoff"
        ))


RESULT_OF_FAILURE = {FORBIDDEN: m.FORBIDDEN, APPLY_FAILED: m.APPLY_FAILED}
"""The reconcile result counted for each ``ApplyFailure`` reason."""


def _generation(body: Mapping[str, Any] | None) -> Any:
    return (body or {}).get("metadata", {}).get("generation")


class Controller:
    def __init__(
        self, client: KubeClient, config: OperatorConfig, clock: Callable[[], str] = utc_now,
        elector: LeaderElector | None = None,
    ) -> None:
        """Without ``elector`` this replica leads from ``start`` on (a single operator)."""
        self.client, self.config, self.clock, self.elector = client, config, clock, elector
        self.cache = ClusterCache()
        self.metrics = m.OperatorMetrics(queue_depth=self._queue_depth)
        self.scraper = m.CountingKvScraper(self.metrics.kv_scrape_failures, config.metrics_port)
        self.events = EventRecorder(EventWrites(client, self.api), clock, config.instance)
        self.kv: dict[Key, float | None] = {}
        self.scaler = Scaler(self.cache, self.scraper, config, record=self.events.record,
                             clock=clock, enqueue=self._enqueue, leading=lambda: self.leading)
        self.failures: dict[Key, int] = {}
        self.pools = InferencePools()
        self.refused: dict[Key, tuple[int, SpecCheck]] = {}
        """Generations whose children the API server refused as invalid: not retried until
        edited."""
        self.reconciled: collections.Counter[Key] = collections.Counter()
        """Finished reconciles per key, successful or not (what tests wait on)."""
        self._queue: WorkQueue[Key] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._active = elector is None  # took over (KV scraped, keys queued), still leading
        self._takeover: asyncio.Task[None] | None = None
        if elector is not None:
            elector.on_change = self._on_leadership

    @property
    def leading(self) -> bool:
        """Whether this replica may write now."""
        return self._active and (self.elector is None or self.elector.is_leader())

    def _queue_depth(self) -> int:
        return 0 if self._queue is None else len(self._queue)

    async def api(self, call: Awaitable[T]) -> T:
        """Await one API write of ``client``, counting its failure by HTTP status; NotLeader
        (the call not made) unless this replica leads."""
        if not self.leading:
            if inspect.iscoroutine(call):
                call.close()
            raise NotLeader("this replica does not hold the lease")
        try:
            return await call
        except ApiError as error:
            self.metrics.api_error(error)
            raise

    # Event intake (called from kopf handlers; never blocks, never raises on odd objects).
    def _enqueue(self, key: Key | None) -> None:
        if key is not None and self._queue is not None and self.leading:
            self._queue.add(key)

    def on_llmd(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if event_type == "DELETED":
            self.cache.drop_llmd(key)
            self.kv.pop(key, None)
            self.failures.pop(key, None)
            self.refused.pop(key, None)
            self.pools.forget(key)
            self.scaler.forget(key)
            self.reconciled.pop(key, None)
            if self._queue is not None:
                self._queue.forget(key)
            return
        before = self.cache.llmd(key)
        self.cache.put_llmd(body)
        if key in self.failures and before is not None and _generation(before) == _generation(body):
            # Status or metadata only (e.g. our own status patch) while a retry is pending:
            # the backoff, not this event, decides when to try again.
            return
        self._enqueue(key)

    def on_child(self, kind: str, event_type: str | None, body: Mapping[str, Any]) -> None:
        self._enqueue(self.cache.put_child(body, kind, deleted=event_type == "DELETED"))

    def on_pod(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        self._enqueue(self.cache.put_pod(body, deleted=event_type == "DELETED"))

    # Lifecycle.
    async def start(self) -> None:
        await self.scaler.activator.start()
        self._queue = WorkQueue()
        self.events.start()
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.config.workers)]
        self._tasks.append(asyncio.create_task(self._kv_loop()))
        if self.elector is None:
            await self._take_over()
        else:
            self._tasks.append(asyncio.create_task(self.elector.run()))

    async def stop(self) -> None:
        """Stop writing, then give the Lease up (after the last write), then close."""
        if self._queue is not None:
            self._queue.close()
        tasks, self._tasks = [*self._tasks, *([self._takeover] if self._takeover else [])], []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.events.stop(), EVENTS_STOP_S)
        self._active = False
        if self.elector is not None:
            await self.elector.release()
        await self.scaler.activator.stop()
        await self.scraper.close()
        await self.client.close()

    def _on_leadership(self, leading: bool) -> None:
        """The elector's word: take over in a task of its own, or stop (``Scaler.reset``)."""
        self.scaler.reset()
        if self._takeover is not None:
            self._takeover.cancel()
            self._takeover = None
        if leading:
            self._takeover = asyncio.create_task(self._take_over())
            return
        self._active = False
        if self._queue is not None:
            for key in self.failures:
                self._queue.forget(key)  # pending retries: the next leader reconciles anew
        self.failures.clear()

    async def _take_over(self) -> None:
        """Scrape KV figures first (a status without them drops the old leader's), queue all."""
        await self.sample_kv()  # never raises: never hold the Lease without working
        self._active = True
        for key in self.cache.llmd_keys():
            self._enqueue(key)
        logger.info("leading: queued %d LLMDeployments", len(self.cache.llmd_keys()))

    async def _worker(self) -> None:
        assert self._queue is not None
        while True:
            key = await self._queue.get()
            if not self.leading:  # a retry that fired after leadership ended
                self._queue.done(key)
                continue
            try:
                await self.reconcile(key)
                self.failures.pop(key, None)
            except NotLeader:
                logger.info("stopped leading while reconciling %s/%s: left to the leader", *key)
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
                self.reconciled[key] += 1
                self._queue.done(key)

    async def _kv_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.kv_interval_s)
            if self.leading:
                await self.sample_kv()

    async def sample_kv(self) -> None:
        """Scrape ready pods: KV averages, autoscaler (``scaler.py``); wake what changed. A
        failure is logged, never raised: the KV loop and a take-over go on without it."""
        try:
            keys = await self.scaler.sample(self.kv)
        except Exception:
            logger.exception("KV scrape and autoscaling tick failed; the next tick retries")
            return
        for key in keys:
            self._enqueue(key)

    # Reconciliation.
    async def reconcile(self, key: Key) -> str | None:
        """Judge, apply, report; the outcome (one of ``metrics.RESULTS``, counted and timed),
        or None when there is nothing to reconcile (gone, or being deleted). Raises what the
        worker retries with backoff: a failed write once status says so (``forbidden``,
        ``apply_failed``), or an ``error`` (409/429, a failed status patch, a bug)."""
        body = self.cache.llmd(key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        started, result = time.perf_counter(), m.ERROR
        try:
            result, retry = await self._reconcile(key, body)
        except NotLeader:
            result = ""  # not a reconcile: the leader does it
            raise
        finally:
            if result:
                self.metrics.reconciled(result, time.perf_counter() - started)
        if retry is not None:
            raise retry  # status says what failed; the worker retries with backoff
        return result

    async def _reconcile(
        self, key: Key, body: Mapping[str, Any]
    ) -> tuple[str, ApiError | None]:
        """``reconcile``'s work: the result and the error to retry after status was written."""
        namespace, name = key
        generation = int(body["metadata"].get("generation") or 1)
        check = check_spec(name, body.get("spec"))
        refused = self.refused.get(key)
        failure: ApplyFailure | None = None
        retry: ApiError | None = None
        if check.valid and refused is not None and refused[0] == generation:
            check = refused[1]
        elif check.valid:
            try:
                check = await self._apply_children(key, body, check)
            except ChildWriteError as write:
                if write.error.spec_problem:
                    check = SpecCheck(None, None, (write.problem(),))
                    self.refused[key] = (generation, check)
                elif write.error.status in TRANSIENT_STATUSES:
                    raise write.error from None
                else:
                    failure, retry = write.failure(), write.error
        if not check.valid:
            logger.info("%s/%s has an invalid spec: %s", namespace, name, "; ".join(check.problems))
            result = m.INVALID_SPEC
        else:
            result = m.OK if failure is None else RESULT_OF_FAILURE[failure.reason]
        observed = Observed(
            deployment=self.cache.child(key, "Deployment"), pods=self.cache.pods(key),
            kv_cache_utilization=self.kv.get(key),
            inference_pool=self.pools.state(key, check, self.cache.child(key, "InferencePool")),
            autoscaling=self.scaler.report(key, check, body.get("status") or {}),
        )
        current = body.get("status") or {}
        status = compute_status(name, namespace, generation, check, observed, current,
                                self.clock(), failure=failure)  # fmt: skip
        if status_changed(current, status):
            try:
                patched = await self.api(self.client.patch_status(namespace, name, status))
                self.cache.put_llmd(patched)
            except ApiError as error:
                if error.status != 404:  # 404: deleted meanwhile, nothing to report on
                    raise
                return result, None
            for note in condition_events(current, status):
                self.events.record(body, note)
        return result, retry

    async def _apply_children(
        self, key: Key, body: Mapping[str, Any], check: SpecCheck
    ) -> SpecCheck:
        """Apply what is missing or drifted, delete what is unwanted; ChildWriteError if the
        API server did not take a write."""
        scaling = self.scaler.plan(key, check)
        children = render_children(body, check, self.config.engine_image, scaling)
        for desired in self.pools.to_apply(key, children):
            live = self.cache.child(key, desired["kind"])
            if live is not None and covers(desired, live):
                continue
            try:
                applied, created = await self.api(self.client.apply(desired))
            except ApiError as error:
                if self.pools.crd_missing(key, desired, error, self._queue):
                    continue  # reported in the InferencePool condition, tried again later
                raise ChildWriteError("apply", desired["kind"], error) from error
            self.metrics.applied(desired["kind"])
            logger.info("applied %s %s/%s", desired["kind"], *key)
            self.cache.put_child(applied, desired["kind"])
            # Not in the cache and not created: it existed (the cache is still filling after a
            # restart); re-applying it changed nothing worth an Event.
            if created or live is not None:
                verb = "Created" if created else "Updated"
                what = f"{desired['kind']} {desired['metadata']['name']}"
                self.events.record(body, EventNote("Normal", verb, f"{verb.lower()} {what}"))
        for api_version, kind, why in unwanted_children(check, scaling):
            if (live := self.cache.child(key, kind)) is None:
                continue
            try:
                await self.api(self.client.delete(api_version, kind, *key))
            except ApiError as error:
                raise ChildWriteError("delete", kind, error) from error
            self.cache.put_child(live, kind, deleted=True)
            logger.info("deleted %s %s/%s (%s)", kind, *key, why)
            note = EventNote("Normal", "Deleted", f"deleted {kind} {key[1]} ({why})")
            self.events.record(body, note)
        return check

