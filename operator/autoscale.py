"""The autoscaler's decision (pure): per-pod load over time -> the replicas to ask for.

``decide`` is a function of the policy (``spec.autoscaling`` with the engine's limits), the
replicas asked for now, one ``PodState`` per live engine pod, the ``Memory`` the previous
decision left, the time ``now`` (seconds on any monotonic clock) and the time of the latest
request the activator saw. It never reads a clock or the cluster, so tests inject time.

Per target (as the HorizontalPodAutoscaler's algorithm, ``replica_calculator.go``), over the
*capacity* — ready and starting pods; Unschedulable ones are no capacity and their signals do
not count — with ``total`` the sum of the signal over the ready pods that answered a scrape:

* scale up when ``total / (target * capacity) > 1 + tolerance``, to ``ceil(total / target)``
  (starting pods and ready pods without a scrape count as 0, so pods still loading a model
  hold further scale-ups back);
* scale down when ``(total + target * unmeasured) / (target * capacity) < 1 - tolerance``, to
  ``ceil(total / target + unmeasured)`` (pods without a figure count as at target);
* otherwise keep the current count (``tolerance`` 10 %: no flapping on noise).

The highest recommendation of the targets, within ``[minReplicas, maxReplicas]``, is recorded
with its time; the result is the current count moved up to the lowest recommendation of the
last ``scaleUpStabilizationSeconds`` and down to the highest of the last
``scaleDownStabilizationSeconds`` (the HPA's ``stabilizeRecommendationWithBehaviors``), so a
change must persist through its window; a first decision (empty memory: a new leader) counts
the current count as a recommendation made now. A scale-up while some pod is Unschedulable is
held at the current count (``GPUsUnavailable``): more pods would only wait for GPUs too.

Scale to zero (``scaleToZeroAfterSeconds``): after that long without activity — a ready pod
with running or waiting requests, a ready pod that ran engine steps since its previous scrape
(light traffic the gauges miss between scrapes), a ready pod whose load is unknown, a starting
pod, an Unschedulable pod within ``activationTimeoutSeconds`` of a wake-up, or a request at the
activator (one it still holds counts as activity now) — the answer is 0; at 0 it stays 0 until
the activator has seen a request since, then ``minReplicas`` (``Activated``).

Scraped figures are untrusted: each pod's load is clamped (``clamped``), a pod whose signals
are not finite counts as unmeasured, and a recommendation is capped at ``MAX_RECOMMENDATION``
before it is rounded, so no page can overflow the decision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .autoscalespec import MAX_WINDOW_S, TARGET_FIELDS
from .spec import DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS, LLMDeploymentSpec

READY, STARTING, UNSCHEDULABLE = "ready", "starting", "unschedulable"
TOLERANCE = 0.1
MAX_RECOMMENDATIONS = 1024
"""Recommendations kept per object (runs of equal ones are folded into the newest)."""
MAX_REQUESTS = 1e6
"""A pod's running or waiting requests are clamped to this (the engine queues far fewer)."""
MAX_RECOMMENDATION = 1e6
"""A target's raw recommendation is capped here before rounding (over any ``maxReplicas``)."""
SCALED_UP, SCALED_DOWN, SCALED_TO_ZERO, ACTIVATED, STEADY = (
    "ScaledUp",
    "ScaledDown",
    "ScaledToZero",
    "Activated",
    "Steady",
)
GPUS_UNAVAILABLE, TOO_MANY_REPLICAS = "GPUsUnavailable", "TooManyReplicas"


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """The engine's budgets: where ``/ready`` sheds load, tokens and sequences per step."""

    kv_cache_threshold: float = 0.95
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS


@dataclass(frozen=True, slots=True)
class PodLoad:
    """One scrape of a ready pod: the gauges, the mean tokens per engine step since the
    previous scrape (0 when no step ran or there was none) and how many steps ran since."""

    kv_cache_utilization: float
    waiting: float
    running: float
    tokens_per_step: float = 0.0
    steps: float = 0.0


def _bounded(value: float, high: float) -> float:
    return min(max(value, 0.0), high) if math.isfinite(value) else 0.0


def clamped(load: PodLoad, limits: EngineLimits) -> PodLoad:
    """``load`` within what an engine can report: KV in [0, 1], requests up to
    ``MAX_REQUESTS``, tokens per step up to the step's budget; a non-finite figure is 0."""
    return PodLoad(
        _bounded(load.kv_cache_utilization, 1.0),
        _bounded(load.waiting, MAX_REQUESTS),
        _bounded(load.running, MAX_REQUESTS),
        _bounded(load.tokens_per_step, float(limits.max_num_batched_tokens)),
        _bounded(load.steps, math.inf),
    )


def saturation(load: PodLoad, limits: EngineLimits) -> float:
    """How full the pod is, counting the queue: its fullest budget (KV cache up to the
    readiness threshold, the step's token budget, the sequence slots) times the demand per
    running request, ``(running + waiting) / max(running, 1)``. 1 is full with no queue."""
    use = max(
        load.kv_cache_utilization / limits.kv_cache_threshold,
        load.tokens_per_step / limits.max_num_batched_tokens,
        load.running / limits.max_num_seqs,
    )
    return use * (load.running + load.waiting) / max(load.running, 1.0)


def pod_signals(load: PodLoad, limits: EngineLimits) -> dict[str, float]:
    """The pod's value of each target's signal (of its clamped load), by the targets' wire
    names."""
    load = clamped(load, limits)
    values = (load.kv_cache_utilization, load.waiting, saturation(load, limits))
    return dict(zip(TARGET_FIELDS, values))


@dataclass(frozen=True, slots=True)
class PodState:
    """A live engine pod: ``READY`` (``load`` None when its scrape gave nothing), ``STARTING``
    (scheduled, not ready) or ``UNSCHEDULABLE`` (``PodScheduled=False/Unschedulable``)."""

    name: str
    state: str
    load: PodLoad | None = None


@dataclass(frozen=True, slots=True)
class Policy:
    """``spec.autoscaling`` as the decision reads it; ``scale_to_zero_after_s`` None: never 0."""

    min_replicas: int
    max_replicas: int
    targets: Mapping[str, float]
    up_window_s: float = 0.0
    down_window_s: float = 300.0
    scale_to_zero_after_s: float | None = None
    limits: EngineLimits = field(default_factory=EngineLimits)
    tolerance: float = TOLERANCE
    activation_timeout_s: float = 300.0

    @classmethod
    def from_spec(cls, spec: LLMDeploymentSpec, *, can_scale_to_zero: bool = True) -> Policy:
        """The policy of a spec with ``autoscaling``; without the activator's address
        (``can_scale_to_zero`` False) it never scales to zero."""
        scaling = spec.autoscaling
        assert scaling is not None, "only specs with autoscaling have a policy"
        engine = spec.engine
        limits = EngineLimits(
            spec.readiness.kv_cache_threshold,
            engine.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS,
            engine.max_num_seqs or DEFAULT_MAX_NUM_SEQS,
        )
        targets = {k: v for k, v in scaling.targets.values().items() if v is not None}
        to_zero = scaling.scale_to_zero_after_seconds if can_scale_to_zero else None
        return cls(scaling.min_replicas, scaling.max_replicas, targets,
                   scaling.scale_up_stabilization_seconds,
                   scaling.scale_down_stabilization_seconds, to_zero, limits,
                   activation_timeout_s=scaling.activation_timeout_seconds)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Memory:
    """What one decision leaves for the next: timed recommendations, the last activity,
    since when the answer has been 0, and the time of the last wake-up (``Activated``)."""

    recommendations: tuple[tuple[float, int], ...] = ()
    last_active: float | None = None
    zero_since: float | None = None
    activated_at: float | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The replicas to ask for and why; ``limited`` is (reason, message) while a bound or
    missing GPUs hold the count back; ``signals`` are the means over ``measured`` pods."""

    desired: int
    reason: str
    message: str
    signals: dict[str, float]
    measured: int
    memory: Memory
    limited: tuple[str, str] | None = None


def _ceil(value: float) -> int:
    return math.ceil(value - 1e-9)  # 2.0000000001 from float noise is 2


def recommend(values: Sequence[float], target: float, capacity: int, current: int,
              tolerance: float = TOLERANCE) -> int:  # fmt: skip
    """One target's recommendation (see the module docstring); ``values`` are the measured
    pods', ``capacity`` counts ready and starting pods."""
    if capacity == 0:
        return current
    total, unmeasured = sum(values), capacity - len(values)
    if total / (target * capacity) > 1 + tolerance:
        return _ceil(min(total / target, MAX_RECOMMENDATION))
    if (total + target * unmeasured) / (target * capacity) < 1 - tolerance:
        return min(_ceil(min(total / target + unmeasured, MAX_RECOMMENDATION)), current)
    return current


def _busy(pod: PodState, waking: bool) -> bool:
    if pod.state == READY:
        load = pod.load
        return load is None or load.running + load.waiting > 0 or load.steps > 0
    return pod.state == STARTING or waking  # Unschedulable: only while a wake-up waits


def _last_active(policy: Policy, pods: Sequence[PodState], memory: Memory, now: float,
                 demand_at: float | None) -> float:  # fmt: skip
    woke = memory.activated_at
    waking = woke is not None and now - woke < policy.activation_timeout_s
    busy = any(_busy(p, waking) for p in pods)
    active = now if busy or memory.last_active is None else memory.last_active
    return active if demand_at is None else max(active, demand_at)


def _stabilised(policy: Policy, memory: Memory, now: float, current: int,
                wanted: int) -> tuple[int, tuple[tuple[float, int], ...]]:  # fmt: skip
    """The count moved from ``current`` toward ``wanted`` as far as the windows allow, and
    the recommendations to keep. A first decision counts ``current`` as made now; a run of
    equal recommendations keeps only its newest time (the same windowed min and max); at most
    ``MAX_RECOMMENDATIONS`` are kept."""
    history = [(t, r) for t, r in memory.recommendations if t > now - MAX_WINDOW_S]
    if memory.last_active is None:
        history = [(now, current)]
    up = min([wanted] + [r for t, r in history if t > now - policy.up_window_s])
    down = max([wanted] + [r for t, r in history if t > now - policy.down_window_s])
    desired = min(max(min(max(current, up), down), policy.min_replicas), policy.max_replicas)
    if history and history[-1][1] == wanted:
        history = history[:-1]
    return desired, (*history, (now, wanted))[-MAX_RECOMMENDATIONS:]


def _at_zero(policy: Policy, memory: Memory, now: float, demand_at: float | None,
             signals: dict[str, float]) -> Decision:  # fmt: skip
    since = memory.zero_since  # None: not known (a new leader), any request wakes it
    if demand_at is not None and (since is None or demand_at >= since):
        desired = policy.min_replicas
        woken = Memory(recommendations=((now, desired),), last_active=now, activated_at=now)
        return Decision(desired, ACTIVATED, f"a request reached the activator: 0 -> {desired}",
                        signals, 0, woken)  # fmt: skip
    asleep = Memory(last_active=memory.last_active, zero_since=since)
    return Decision(0, STEADY, "scaled to zero; the next request wakes it", signals, 0, asleep)


def decide(policy: Policy, current: int, pods: Sequence[PodState], memory: Memory, now: float,
           demand_at: float | None = None) -> Decision:  # fmt: skip
    """The replicas to ask for now (see the module docstring)."""
    loads = [p.load for p in pods if p.state == READY and p.load is not None]
    per_pod = [pod_signals(load, policy.limits) for load in loads]
    per_pod = [s for s in per_pod if all(math.isfinite(v) for v in s.values())]
    means = (
        {name: sum(s[name] for s in per_pod) / len(per_pod) for name in TARGET_FIELDS}
        if per_pod
        else {}
    )
    to_zero = policy.scale_to_zero_after_s
    if current == 0 and to_zero is not None:
        return _at_zero(policy, memory, now, demand_at, means)
    active = _last_active(policy, pods, memory, now, demand_at)
    if to_zero is not None and now - active >= to_zero:
        message = (
            f"no request for {now - active:.0f} s (scaleToZeroAfterSeconds {to_zero:g}): "
            f"{current} -> 0; the activator holds the next request and wakes it"
        )
        return Decision(0, SCALED_TO_ZERO, message, means, len(per_pod),
                        Memory(last_active=active, zero_since=now))  # fmt: skip
    capacity = sum(1 for p in pods if p.state != UNSCHEDULABLE)
    recs = {
        name: recommend([s[name] for s in per_pod], target, capacity, current, policy.tolerance)
        for name, target in policy.targets.items()
    }
    driver = max(recs, key=lambda name: recs[name]) if recs else None
    raw = current if driver is None else recs[driver]
    wanted = min(max(raw, policy.min_replicas), policy.max_replicas)
    desired, history = _stabilised(policy, memory, now, current, wanted)
    after = Memory(history, active, activated_at=memory.activated_at)
    unschedulable = sum(1 for p in pods if p.state == UNSCHEDULABLE)
    limited = None
    if desired > current and unschedulable:
        held = max(current, policy.min_replicas)
        limited = (
            GPUS_UNAVAILABLE,
            f"the load asks for {desired} replicas; holding at {held} "
            f"while {unschedulable} pod(s) stay Unschedulable (no capacity until scheduled)",
        )
        desired = held
    elif raw > policy.max_replicas:
        limited = (
            TOO_MANY_REPLICAS,
            f"the load asks for {raw} replicas; maxReplicas is {policy.max_replicas}",
        )
    reason = SCALED_UP if desired > current else SCALED_DOWN if desired < current else STEADY
    return Decision(desired, reason, _why(policy, driver, means, len(per_pod), current, desired),
                    means, len(per_pod), after, limited)  # fmt: skip


def _why(policy: Policy, driver: str | None, means: Mapping[str, float], measured: int,
         current: int, desired: int) -> str:  # fmt: skip
    change = f"{current} -> {desired}"
    if driver is None or driver not in means:
        bound = policy.min_replicas if desired <= policy.min_replicas else policy.max_replicas
        return f"no load figure yet; within [minReplicas, maxReplicas] ({bound}): {change}"
    side = "above" if desired > current else "below" if desired < current else "at"
    return (
        f"{driver} {means[driver]:.2f} {side} target {policy.targets[driver]:g} over "
        f"{measured} measured pod(s): {change}"
    )


@dataclass(frozen=True, slots=True)
class ScalingReport:
    """The autoscaler's part of an LLMDeployment's status: the replicas it asks for,
    ``status.autoscaling``, its conditions (type, (status, reason, message)) and the Ready
    message while it holds the deployment at zero."""

    desired: int
    status: Mapping[str, object]
    conditions: tuple[tuple[str, tuple[str, str, str]], ...] = ()
    zero_message: str = ""
