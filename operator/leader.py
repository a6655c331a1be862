"""Leader election on a ``coordination.k8s.io/v1`` Lease, as client-go's ``leaderelection`` does.

Every replica runs a ``LeaderElector`` on the same Lease (``OperatorConfig.lease_name`` in
``lease_namespace``), its identity the pod's name (``OperatorConfig.instance``). Every
``retry_period_s`` it reads the Lease and:

* takes it when it is free (no Lease yet: create it; ``holderIdentity`` empty, as a clean
  release leaves it) or expired: the record (holder, times, transitions) has not changed for
  ``leaseDurationSeconds`` by this replica's own clock since it first saw that record (client-go
  measures from when it observed the record, not from ``renewTime``, so clocks need not agree);
  ``acquireTime`` is now and ``leaseTransitions`` goes up by one;
* renews it when it holds it (``renewTime`` moves; ``acquireTime`` and ``leaseTransitions``
  stay);
* writes with the ``resourceVersion`` it read (an update, never a blind write), so of two
  candidates that read the same record one gets 409 Conflict and stays standby; a create race
  ends the same way (409 AlreadyExists).

``is_leader`` is true only while the last successful acquire or renew started less than
``renew_deadline_s`` ago (``renew_deadline_s < lease_duration_s``): a leader that cannot renew
stops writing at that moment, without waiting for its loop, and before any other replica may
take the expired Lease. A leader that sees another holder stops at once. ``release`` (on a
clean shutdown) clears ``holderIdentity`` and sets ``leaseDurationSeconds`` to 1, so a standby
takes over on its next try instead of waiting for the Lease to expire.

This is not fencing: a write already sent when the deadline passes still lands (client-go has
the same limit). The controller checks ``is_leader`` before each write (``Controller.api``).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from .config import OperatorConfig
from .kube import ApiError, KubeClient, object_path

logger = logging.getLogger(__name__)

API_VERSION = "coordination.k8s.io/v1"
KIND = "Lease"
JITTER = 0.2
"""A candidate waits up to 20 % longer than ``retry_period_s`` between tries (client-go's
``JitterFactor`` 1.2), so replicas started together do not keep colliding."""


class NotLeader(Exception):
    """A write was refused because this replica does not hold the Lease."""


def micro_time(now: datetime.datetime) -> str:
    """A ``metav1.MicroTime`` (RFC 3339 with microseconds, UTC)."""
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _record(spec: Any) -> dict[str, Any]:
    """The election record of a Lease's spec (what "changed" is judged on)."""
    spec = spec if isinstance(spec, dict) else {}
    keys = ("holderIdentity", "leaseDurationSeconds", "acquireTime", "renewTime",
            "leaseTransitions")  # fmt: skip
    return {key: spec.get(key) for key in keys}


class LeaderElector:
    """Campaigns for, renews and releases one Lease. ``on_change(leading)`` is called from
    ``run``'s task when this replica starts or stops leading; ``monotonic`` measures expiry
    and deadlines, ``now`` gives the Lease's timestamps (both injectable for tests)."""

    def __init__(
        self, client: KubeClient, config: OperatorConfig, *,
        monotonic: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime.datetime] = _utc_now,
    ) -> None:  # fmt: skip
        self.client, self.identity = client, config.instance
        self.name, self.namespace = config.lease_name, config.lease_namespace
        self.duration_s = config.lease_duration_s
        self.renew_deadline_s = config.lease_renew_deadline_s
        self.retry_period_s = config.lease_retry_period_s
        self.monotonic, self.now = monotonic, now
        self.on_change: Callable[[bool], None] = lambda _leading: None
        self.leading = False
        """The loop's view: set by a successful acquire, cleared when it notices a loss."""
        self._renewed_at: float | None = None
        self._observed: dict[str, Any] | None = None
        self._observed_at = 0.0
        self.observed_version: str | None = None
        """The ``resourceVersion`` of the Lease as last read or written (for tests)."""
        self.attempts = self.failures = 0

    @property
    def path(self) -> str:
        return object_path(API_VERSION, KIND, self.namespace, self.name)

    @property
    def holder(self) -> str | None:
        """The holder in the record last read or written ("" when released)."""
        return None if self._observed is None else self._observed["holderIdentity"]

    def is_leader(self) -> bool:
        """Whether this replica may write now: it holds the Lease and renewed it in time."""
        return self.leading and self._renewed_at is not None and \
            self.monotonic() - self._renewed_at < self.renew_deadline_s

    async def run(self) -> None:
        """Campaign and renew until cancelled (``release`` afterwards gives the Lease up)."""
        while True:
            await self.step()
            pause = self.retry_period_s
            if not self.leading:
                pause *= 1 + random.uniform(0, JITTER)
            await asyncio.sleep(pause)

    async def step(self) -> bool:
        """One try to acquire or renew; whether this replica holds the Lease afterwards."""
        self.attempts += 1
        started, lapsed = self.monotonic(), self.leading and not self.is_leader()
        try:
            async with asyncio.timeout(self.renew_deadline_s):
                held = await self._try_acquire_or_renew()
        except (ApiError, TimeoutError) as error:
            logger.info("lease %s/%s: %s", self.namespace, self.name, error)
            held = False
        except Exception:  # a bug must not end the campaign for good
            logger.exception("lease %s/%s: unexpected error", self.namespace, self.name)
            held = False
        if held:
            if lapsed:  # past the deadline, nobody took it: a new term (what it missed is
                self._set_leading(False)  # queued again on taking over)
            self._renewed_at = started
            self._set_leading(True)
        else:
            self.failures += 1
            if self.leading and not self.is_leader():
                logger.warning("lease %s/%s not renewed within %.0fs: stopped leading",
                               self.namespace, self.name, self.renew_deadline_s)  # fmt: skip
                self._set_leading(False)
        return held

    def _set_leading(self, leading: bool) -> None:
        if leading != self.leading:
            self.leading = leading
            logger.info("%s %s leading (lease %s/%s)", self.identity,
                        "started" if leading else "stopped", self.namespace, self.name)
            self.on_change(leading)

    def _observe(self, lease: dict[str, Any]) -> None:
        record = _record(lease.get("spec"))
        if record != self._observed:
            self._observed, self._observed_at = record, self.monotonic()
        self.observed_version = (lease.get("metadata") or {}).get("resourceVersion")

    async def _get(self) -> dict[str, Any] | None:
        try:
            return await self.client.request("GET", self.path)
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    async def _try_acquire_or_renew(self) -> bool:
        now = micro_time(self.now())
        mine = {"holderIdentity": self.identity, "leaseDurationSeconds": self.duration_s,
                "acquireTime": now, "renewTime": now}  # fmt: skip
        lease = await self._get()
        if lease is None:
            body = {"apiVersion": API_VERSION, "kind": KIND,
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": {**mine, "leaseTransitions": 0}}  # fmt: skip
            path = self.path.rsplit("/", 1)[0]
            self._observe(await self.client.request("POST", path, body=body))
            return True
        self._observe(lease)
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        transitions = int(spec.get("leaseTransitions") or 0)
        if holder == self.identity:
            mine |= {"acquireTime": spec.get("acquireTime") or now,
                     "leaseTransitions": transitions}  # fmt: skip
        elif holder and not self._expired(spec):
            if self.leading:
                logger.warning("lease %s/%s is held by %s: stopped leading",
                               self.namespace, self.name, holder)  # fmt: skip
                self._set_leading(False)
            return False
        else:
            mine["leaseTransitions"] = transitions + 1
        self._observe(await self._update(lease, mine))
        return True

    def _expired(self, spec: dict[str, Any]) -> bool:
        duration = float(spec.get("leaseDurationSeconds") or 0)
        return self.monotonic() - self._observed_at >= duration

    async def _update(self, lease: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
        """PUT ``lease`` with ``record`` as its spec, under the resourceVersion it was read
        with (a newer write answers 409 Conflict)."""
        body = {**lease, "spec": {**(lease.get("spec") or {}), **record}}
        return await self.client.request("PUT", self.path, body=body)

    async def release(self) -> bool:
        """Give the Lease up if this replica holds it (holder cleared, duration 1 s); never
        raises. Call it after the last write."""
        was_leading = self.leading
        self.leading, self._renewed_at = False, None
        if not was_leading:
            return False
        try:
            async with asyncio.timeout(self.renew_deadline_s):
                lease = await self._get()
                spec = (lease or {}).get("spec") or {}
                if lease is None or spec.get("holderIdentity") != self.identity:
                    return False
                now = micro_time(self.now())
                await self._update(lease, {
                    "holderIdentity": "", "leaseDurationSeconds": 1, "acquireTime": now,
                    "renewTime": now, "leaseTransitions": int(spec.get("leaseTransitions") or 0),
                })
        except Exception as error:  # the Lease then expires by itself
            logger.info("could not release lease %s/%s: %s", self.namespace, self.name, error)
            return False
        logger.info("%s released lease %s/%s", self.identity, self.namespace, self.name)
        return True
