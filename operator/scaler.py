"""The autoscaler in the operator: scrape, decide, remember; what reconcile renders and reports.

Each KV tick of the leader (``Controller.sample_kv``) calls ``Scaler.sample``: every ready
engine pod is scraped once (``kvmetrics``); the KV averages are refreshed as before; and for
each LLMDeployment with ``spec.autoscaling`` the pure ``autoscale.decide`` gets the live pods
(ready with their load, starting, or Unschedulable), the replicas asked for now, what the last
decision left and the time. A decision that changes the replicas is one Event (its reason and
why) and ``status.autoscaling.lastDecision``; the keys whose replicas or reported figures
changed are returned for reconcile, which renders the Deployment with ``plan``'s replicas
(through the one apply path of every child) and writes ``report`` into status. The operator
never writes ``spec.replicas``.

The replicas asked for now are the last decision's (within the spec's current bounds); before
this term's first decision, the live Deployment's, else ``minReplicas``. ``reset`` forgets
every table when this replica loses or takes leadership, and a tick that ran across a change
of term decides nothing, so a new term never acts on what an old one remembered.

The scale-to-zero part: with ``scaleToZeroAfterSeconds`` and this replica's pod IP known
(``OperatorConfig.pod_ip``), the Service gets the activator's EndpointSlice from the decision
to go to zero until an engine pod is ready again; a request at the activator (``demand``)
wakes a deployment at zero at once, and one it still holds counts as activity at every tick.
State is per replica and in memory: a new leader starts its windows afresh. One LLMDeployment
whose decision fails is logged and skipped; the others are still decided.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from .activator import Activator, addresses_of
from .autoscale import (
    READY,
    STARTING,
    UNSCHEDULABLE,
    Decision,
    Memory,
    PodLoad,
    PodState,
    Policy,
    ScalingReport,
    decide,
)
from .cache import ClusterCache, Key
from .checks import SpecCheck
from .config import OperatorConfig
from .events import EventNote
from .kvmetrics import KvScraper, PodSample, kv_average
from .podhealth import Pod, is_live, is_ready
from .render import Scaling
from .spec import LLMDeploymentSpec

logger = logging.getLogger(__name__)

LIMITED, WITHIN_RANGE = "ScalingLimited", "DesiredWithinRange"
SCALED_TO_ZERO = "ScaledToZero"


def unschedulable(pod: Pod) -> bool:
    return any(cond.get("type") == "PodScheduled" and cond.get("status") == "False"
               and cond.get("reason") == "Unschedulable"
               for cond in pod.get("status", {}).get("conditions") or [])  # fmt: skip


def autoscaled(body: Mapping[str, Any] | None) -> LLMDeploymentSpec | None:
    """The parsed spec of ``body`` when it is valid and has ``autoscaling``, else None."""
    raw = (body or {}).get("spec")
    if not isinstance(raw, Mapping) or raw.get("autoscaling") is None:
        return None
    try:
        return LLMDeploymentSpec.model_validate(dict(raw))
    except ValidationError:
        return None


class Scaler:
    """Autoscaling state of every LLMDeployment, for one operator replica. ``record`` writes
    an Event, ``enqueue`` queues a reconcile, ``leading`` says whether this replica may act,
    ``monotonic`` measures the windows and ``clock`` stamps decisions (both injectable)."""

    def __init__(
        self, cache: ClusterCache, scraper: KvScraper, config: OperatorConfig, *,
        record: Callable[[Mapping[str, Any], EventNote], None], clock: Callable[[], str],
        enqueue: Callable[[Key], None], leading: Callable[[], bool],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.cache, self.scraper, self.pod_ip = cache, scraper, config.pod_ip
        self.record, self.clock, self.enqueue, self.leading = record, clock, enqueue, leading
        self.monotonic = monotonic
        self.activator = Activator(self, config.metrics_port, config.activator_port,
                                   host=listen_host(config.pod_ip))  # fmt: skip
        self._term = 0
        self._memory: dict[Key, Memory] = {}
        self._decisions: dict[Key, Decision] = {}
        self._desired: dict[Key, int] = {}
        self._last: dict[Key, dict[str, Any]] = {}
        self._demand: dict[Key, float] = {}
        self._steps: dict[str, tuple[float, float]] = {}
        """Per pod uid: the step histogram's (sum, count) at its previous scrape."""

    def forget(self, key: Key) -> None:
        for table in (self._memory, self._decisions, self._desired, self._last, self._demand):
            table.pop(key, None)

    def reset(self) -> None:
        """Forget everything (leadership changed hands): the next decisions start afresh from
        the live Deployments; a tick in flight is discarded."""
        for table in (self._memory, self._decisions, self._desired, self._last, self._demand,
                      self._steps):  # fmt: skip
            table.clear()
        self._term += 1

    # The KV tick.
    async def sample(self, kv: dict[Key, float | None]) -> list[Key]:
        """Scrape, refresh ``kv`` (rounded averages) and decide; the keys to reconcile."""
        keys, term = self.cache.llmd_keys(), self._term
        ready = {key: [p for p in self.cache.pods(key) if is_ready(p)] for key in keys}
        scraped = await asyncio.gather(*(self.scraper.samples(ready[key]) for key in keys))
        if term != self._term:
            return []  # leadership changed hands while scraping
        steps, wake = {}, []
        for key, samples in zip(keys, scraped):
            try:
                value = kv_average(samples.values())
                rounded = None if value is None else round(value, 2)
                loads = {
                    name: self._load(pod, samples[name], steps)
                    for pod in ready[key]
                    if (name := pod["metadata"]["name"]) in samples
                }
                changed = self._decide(key, loads)
            except Exception:  # one object's bug must not stop the others' autoscaling
                logger.exception("autoscaling %s/%s failed this tick", *key)
                continue
            if kv.get(key) != rounded or changed:
                kv[key] = rounded
                wake.append(key)
        self._steps = steps
        return wake

    def _load(self, pod: Pod, sample: PodSample, steps: dict[str, tuple[float, float]]
              ) -> PodLoad | None:  # fmt: skip
        """The pod's load; None when the page lacks the request gauges (load unknown). Steps
        count only when at least one ran; counters that went back (a restart) give no step
        figure for this tick. ``decide`` clamps what it reads (``autoscale.clamped``)."""
        uid = pod["metadata"].get("uid") or pod["metadata"]["name"]
        tokens_per_step = ran = 0.0
        if sample.step_tokens is not None and sample.steps is not None:
            before = self._steps.get(uid)
            steps[uid] = (sample.step_tokens, sample.steps)
            if before is not None and sample.steps - before[1] >= 1:
                ran, tokens = sample.steps - before[1], sample.step_tokens - before[0]
                tokens_per_step = tokens / ran if tokens >= 0 else 0.0
        if sample.waiting is None or sample.running is None:
            return None
        return PodLoad(sample.kv_cache_utilization, sample.waiting, sample.running,
                       tokens_per_step, ran)  # fmt: skip

    def _decide(self, key: Key, loads: Mapping[str, PodLoad | None]) -> bool:
        """Run ``decide`` for ``key``; whether what reconcile renders or reports changed."""
        body = self.cache.llmd(key)
        spec = autoscaled(body)
        if spec is None or body is None:
            had = key in self._memory
            self.forget(key)
            return had
        policy = Policy.from_spec(spec, can_scale_to_zero=self.pod_ip is not None)
        pods = [_pod_state(p, loads) for p in self.cache.pods(key) if is_live(p)]
        current, now = self.replicas(key, spec), self.monotonic()
        demand_at = now if self.activator.holding(key) else self._demand.get(key)
        decision = decide(policy, current, pods, self._memory.get(key, Memory()), now,
                          demand_at)  # fmt: skip
        before = self._decisions.get(key)
        self._memory[key], self._decisions[key] = decision.memory, decision
        self._desired[key] = decision.desired
        if decision.desired != current:
            self._last[key] = {
                "time": self.clock(),
                "from": current,
                "to": decision.desired,
                "reason": decision.reason,
                "message": decision.message[:1024],
            }
            logger.info("%s/%s: %s", *key, decision.message)
            self.record(body, EventNote("Normal", decision.reason, decision.message))
            return True
        seen = (_rounded(decision.signals), decision.measured, decision.limited)
        return before is None or seen != (_rounded(before.signals), before.measured, before.limited)

    # What reconcile asks.
    def replicas(self, key: Key, spec: LLMDeploymentSpec) -> int:
        """The replicas asked for now (see the module docstring)."""
        scaling = spec.autoscaling
        assert scaling is not None
        if key in self._desired:
            desired = self._desired[key]
            if desired == 0 and scaling.scale_to_zero_after_seconds is not None:
                return 0
            return min(max(desired, scaling.min_replicas), scaling.max_replicas)
        live = ((self.cache.child(key, "Deployment") or {}).get("spec") or {}).get("replicas")
        if not isinstance(live, int):
            return scaling.min_replicas
        if live == 0 and scaling.scale_to_zero_after_seconds is not None:
            return 0  # asleep when this replica took over
        return min(max(live, scaling.min_replicas), scaling.max_replicas)

    def _needs_activator(self, key: Key, spec: LLMDeploymentSpec, replicas: int) -> bool:
        assert spec.autoscaling is not None
        if spec.autoscaling.scale_to_zero_after_seconds is None or self.pod_ip is None:
            return False
        if replicas == 0:
            return True
        waking = self.cache.child(key, "EndpointSlice") is not None
        return waking and not any(is_ready(p) for p in self.cache.pods(key))

    def plan(self, key: Key, check: SpecCheck) -> Scaling | None:
        """What the render takes from the autoscaler (None without ``spec.autoscaling``)."""
        spec = check.spec
        if spec is None or spec.autoscaling is None:
            return None
        replicas = self.replicas(key, spec)
        address = self.pod_ip if self._needs_activator(key, spec, replicas) else None
        return Scaling(replicas, None if address is None else (address, self.activator.port))

    def report(self, key: Key, check: SpecCheck,
               current: Mapping[str, Any]) -> ScalingReport | None:  # fmt: skip
        """``status.autoscaling`` and the conditions (None without ``spec.autoscaling``);
        ``current`` is the status the object holds (its lastDecision outlives a failover)."""
        spec = check.spec
        if spec is None or spec.autoscaling is None:
            return None
        scaling, desired = spec.autoscaling, self.replicas(key, spec)
        decision = self._decisions.get(key)
        last = self._last.get(key) or ((current.get("autoscaling") or {}).get("lastDecision"))
        status = {
            "desiredReplicas": desired,
            "currentSignal": _rounded(decision.signals) if decision and decision.signals else None,
            "measuredReplicas": None if decision is None else decision.measured,
            "lastDecision": last,
        }
        limited = None if decision is None else decision.limited
        bounds = f"{desired} replicas within [{scaling.min_replicas}, {scaling.max_replicas}]"
        conditions = [(LIMITED, ("True", *limited) if limited else ("False", WITHIN_RANGE, bounds))]
        zero = (
            f"scaled to zero after {scaling.scale_to_zero_after_seconds} s without a request; "
            f"the activator holds the next one (up to {scaling.activation_timeout_seconds} s) "
            "and wakes the deployment"
        )
        if scaling.scale_to_zero_after_seconds is not None:
            conditions.append((SCALED_TO_ZERO, self._zero_state(desired, zero)))
        return ScalingReport(desired, status, tuple(conditions), zero)

    def _zero_state(self, desired: int, message: str) -> tuple[str, str, str]:
        if self.pod_ip is None:
            return ("False", "ActivatorUnavailable", "scale to zero needs the activator's "
                    "address: the operator runs without METROLINE_POD_IP")  # fmt: skip
        return ("True", "NoRequests", message) if desired == 0 else ("False", "Serving", "")

    # The activator's directory (activator.Directory).
    def find(self, host: str) -> Key | None:
        """The LLMDeployment whose Service ``host`` names (``name``, ``name.namespace``,
        ``name.namespace.svc``, ``name.namespace.svc.<cluster domain>``, with an optional
        ``:port``; a short name only when unique) among those that scale to zero and whose
        Service the activator fronts now (their EndpointSlice exists); else None. Nothing
        the client sends besides the Host header chooses the target."""
        labels = host.rsplit(":", 1)[0].lower().split(".") if host else []
        keys = [k for k in self.cache.llmd_keys() if _scales_to_zero(self.cache.llmd(k))
                and self.cache.child(k, "EndpointSlice") is not None]  # fmt: skip
        if len(labels) >= 2 and labels[2:3] in ([], ["svc"]) and (labels[1], labels[0]) in keys:
            return labels[1], labels[0]
        named = [key for key in keys if labels == [key[1]]]
        return named[0] if len(named) == 1 else None

    def demand(self, key: Key) -> None:
        """A request for ``key`` reached the activator: activity, and a wake-up at zero."""
        self._demand[key] = self.monotonic()
        spec = autoscaled(self.cache.llmd(key))
        if (
            self.leading()
            and spec is not None
            and self.replicas(key, spec) == 0
            and self._decide(key, {})
        ):
            self.enqueue(key)

    def addresses(self, key: Key) -> list[str]:
        return addresses_of(p for p in self.cache.pods(key) if is_ready(p))

    def hold_s(self, key: Key) -> float:
        spec = autoscaled(self.cache.llmd(key))
        if spec is None or spec.autoscaling is None:
            return 0.0
        return float(spec.autoscaling.activation_timeout_seconds)


def _pod_state(pod: Pod, loads: Mapping[str, PodLoad | None]) -> PodState:
    name = pod["metadata"]["name"]
    if is_ready(pod):
        return PodState(name, READY, loads.get(name))
    return PodState(name, UNSCHEDULABLE if unschedulable(pod) else STARTING)


def _scales_to_zero(body: Mapping[str, Any] | None) -> bool:
    """Whether ``body`` asks for scale to zero (read from the raw spec, without parsing)."""
    spec = (body or {}).get("spec")
    scaling = spec.get("autoscaling") if isinstance(spec, Mapping) else None
    return isinstance(scaling, Mapping) and scaling.get("scaleToZeroAfterSeconds") is not None


def _rounded(signals: Mapping[str, float]) -> dict[str, float]:
    return {name: round(value, 2) for name, value in signals.items()}


def listen_host(pod_ip: str | None) -> str:
    """Where the activator binds: all addresses of the pod IP's family (``::`` also accepts
    IPv4 on a dual-stack host)."""
    return "::" if pod_ip is not None and ":" in pod_ip else "0.0.0.0"
