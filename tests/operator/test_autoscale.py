"""The autoscaler's decision (``operator/autoscale.py``) as a pure function: load over time in,
replicas out, time injected (never slept); and the API it reads (``spec.autoscaling``:
admission, defaults) and the engine page it scrapes (the engine's own metrics).

The numbers of docs/operator.md's worked example are the ones here: saturation target 0.8,
two pods at KV 0.32 with 7800 tokens per step of an 8192-token budget, 12 running and 6 waiting
-> saturation 1.43 -> 4 replicas, where a KV target of 0.7 alone would recommend 1
(clamped to minReplicas 2).
"""

from __future__ import annotations

import pytest

from metroline.engine.client.request_events import IterationStats
from metroline.engine.messages import SchedulerStats
from metroline.engine.server.metrics import ServerMetrics
from metroline.operator.autoscale import (
    MAX_RECOMMENDATIONS,
    READY,
    STARTING,
    UNSCHEDULABLE,
    EngineLimits,
    Memory,
    PodLoad,
    PodState,
    Policy,
    decide,
    saturation,
)
from metroline.operator.checks import check_spec
from metroline.operator.kvmetrics import parse_sample

from .conftest import llmd_body
from .crd_validation import defaulted, validate_cr

LIMITS = EngineLimits()  # the engine's defaults: /ready at 0.95, 8192 tokens, 1024 sequences
PREFILL_HEAVY = PodLoad(kv_cache_utilization=0.32, waiting=6, running=12, tokens_per_step=7800)
IDLE = PodLoad(0.05, 0, 0)


def ready(name: str, load: PodLoad | None) -> PodState:
    return PodState(name, READY, load)


def share(demand: float, pods: int) -> list[PodState]:
    """``pods`` ready pods that split a saturation ``demand`` (in pods' worth) evenly, each
    with ``running`` 1: up to 1 per pod from KV (up to its threshold), the rest as a queue:
    saturation = demand / pods."""
    each = demand / pods
    kv, waiting = LIMITS.kv_cache_threshold * min(each, 1.0), max(each - 1.0, 0.0)
    return [ready(f"p{i}", PodLoad(kv, waiting, 1)) for i in range(pods)]


def policy(**overrides) -> Policy:
    base = {"min_replicas": 1, "max_replicas": 8, "targets": {"saturation": 0.8},
            "up_window_s": 0, "down_window_s": 60}  # fmt: skip
    return Policy(**(base | overrides))


class Run:
    """Feeds decisions one after another, as the operator does, keeping the memory."""

    def __init__(self, rules: Policy, replicas: int) -> None:
        self.rules, self.replicas, self.memory = rules, replicas, Memory()
        self.last = None

    def at(self, now: float, pods: list[PodState], demand_at: float | None = None) -> int:
        self.last = decide(self.rules, self.replicas, pods, self.memory, now, demand_at)
        self.memory, self.replicas = self.last.memory, self.last.desired
        return self.replicas


def test_saturation_sees_the_prefill_heavy_load_that_kv_misses():
    assert saturation(PREFILL_HEAVY, LIMITS) == pytest.approx(7800 / 8192 * 18 / 12)  # 1.43
    pods = [ready("a", PREFILL_HEAVY), ready("b", PREFILL_HEAVY)]
    on_saturation = decide(policy(), 2, pods, Memory(), now=0)
    assert (on_saturation.desired, on_saturation.reason) == (4, "ScaledUp")  # ceil(2*1.43/0.8)
    assert on_saturation.signals == pytest.approx(
        {"kvCacheUtilization": 0.32, "waitingRequestsPerReplica": 6, "saturation": 1.428}, abs=1e-3
    )
    assert (
        "saturation 1.43 above target 0.8 over 2 measured pod(s): 2 -> 4" in on_saturation.message
    )
    on_kv = decide(
        policy(targets={"kvCacheUtilization": 0.7}, down_window_s=0), 2, pods, Memory(), now=0
    )
    assert on_kv.desired == 1  # KV alone would shed a saturated deployment
    both = decide(
        policy(targets={"kvCacheUtilization": 0.7, "saturation": 0.8}), 2, pods, Memory(), now=0
    )
    assert both.desired == 4  # the most demanding target decides
    queue = decide(policy(targets={"waitingRequestsPerReplica": 4}), 2, pods, Memory(), now=0)
    assert queue.desired == 3  # 12 waiting / 4 per replica


@pytest.mark.parametrize(("demand", "replicas"), [(1.7, 2), (1.8, 3), (2.4, 3), (1.5, 2)])
def test_a_ten_percent_tolerance_band_keeps_the_count(demand, replicas):
    # 2 pods, target 0.8: 1.7 is 6 % above (kept), 1.8 is 12.5 % above (ceil(2.25) = 3),
    # 1.5 is 6 % below (kept).
    assert decide(policy(), 2, share(demand, 2), Memory(), now=0).desired == replicas


def test_flapping_load_does_not_flap_the_replicas():
    # A demand swinging between 2.4 and 0.4 pods' worth every 15 s: without a window the
    # replicas follow it; with a 60 s scale-down window they go up once and stay.
    swings = [(t * 15.0, 2.4 if t % 2 == 0 else 0.4) for t in range(12)]
    flapping = Run(policy(down_window_s=0), 2)
    assert len({flapping.at(t, share(d, flapping.replicas)) for t, d in swings}) > 1
    steady = Run(policy(down_window_s=60), 2)
    assert [steady.at(t, share(d, steady.replicas)) for t, d in swings] == [3] * 12
    # The low load then persists (the last high one was at 150 s): down once the window
    # no longer holds a high recommendation.
    assert [steady.at(t, share(0.4, 3)) for t in (180, 195, 209)] == [3, 3, 3]
    assert steady.at(210.5, share(0.4, 3)) == 1
    assert steady.last.reason == "ScaledDown"


def test_a_scale_up_window_waits_for_the_load_to_persist():
    run = Run(policy(up_window_s=60), 2)
    assert [run.at(t, share(1.0, 2)) for t in (0, 30)] == [2, 2]
    assert [run.at(t, share(3.2, 2)) for t in (40, 70)] == [2, 2]  # a 30 s spike: no change
    assert run.at(80, share(1.0, 2)) == 2
    assert [run.at(t, share(3.2, 2)) for t in (90, 120, 139)] == [2, 2, 2]
    assert run.at(140.5, share(3.2, 2)) == 4  # the low one of 80 s has left the window


def test_unschedulable_pods_are_no_capacity_and_hold_the_scale_up():
    waiting_for_gpu = PodState("p2", UNSCHEDULABLE)
    held = decide(policy(), 3, [*share(3.2, 2), waiting_for_gpu], Memory(), now=0)
    assert held.desired == 3 and held.reason == "Steady"
    assert held.limited is not None and held.limited[0] == "GPUsUnavailable"
    assert "asks for 4 replicas; holding at 3" in held.limited[1]
    assert held.measured == 2 and held.signals["saturation"] == pytest.approx(1.6)
    # The same load once that pod is scheduled (loading: capacity at 0 load): the fourth.
    scheduled = decide(policy(), 3, [*share(3.2, 2), PodState("p2", STARTING)], Memory(), now=0)
    assert (scheduled.desired, scheduled.limited) == (4, None)
    # A load the two running pods' worth of capacity already covers adds nothing.
    covered = decide(policy(), 3, [*share(2.0, 2), waiting_for_gpu], Memory(), now=0)
    assert (covered.desired, covered.limited) == (3, None)


def test_starting_pods_hold_further_scale_ups_back():
    # Scaled to 4 for 3.2 pods' worth; two pods still load the model: no fifth, no sixth.
    loading = [*share(3.2, 2), PodState("p2", STARTING), PodState("p3", STARTING)]
    assert decide(policy(), 4, loading, Memory(), now=0).desired == 4


def test_pods_without_a_figure_count_at_target_on_scale_down():
    low = PodLoad(0.1, 0, 1)
    pods = [ready("a", low), ready("b", low), ready("c", None), ready("d", None)]
    rules = policy(targets={"kvCacheUtilization": 0.7}, down_window_s=0)
    assert decide(rules, 4, pods, Memory(), now=0).desired == 3  # ceil(0.2/0.7 + 2)


def test_bounds_and_too_many_replicas():
    run = Run(policy(max_replicas=8), 2)
    assert run.at(0, share(8.0, 2)) == 8
    assert run.last.limited[0] == "TooManyReplicas" and "asks for 10" in run.last.limited[1]
    assert Run(policy(min_replicas=2), 5).at(0, share(0.1, 5)) == 5  # the 60 s window first
    assert Run(policy(min_replicas=2, down_window_s=0), 5).at(0, share(0.1, 5)) == 2


def test_scale_to_zero_after_idle_and_the_wake_up():
    run = Run(policy(scale_to_zero_after_s=300), 1)
    busy = [ready("a", PodLoad(0.2, 0, 1))]
    idle = [ready("a", IDLE)]
    assert run.at(0, busy) == 1
    assert [run.at(t, idle) for t in (100, 200, 299)] == [1, 1, 1]
    assert run.at(300, idle) == 0
    assert run.last.reason == "ScaledToZero" and "no request for 300 s" in run.last.message
    assert [run.at(t, []) for t in (400, 500)] == [0, 0]  # no request: it stays at zero
    assert run.at(500.5, [], demand_at=500.2) == 1  # a request at the activator
    assert run.last.reason == "Activated"
    # Waking: the pod loads for longer than the idle timeout, then serves.
    assert [run.at(t, [PodState("b", STARTING)]) for t in (700, 900, 1000)] == [1, 1, 1]
    assert run.at(1100, [ready("b", IDLE)]) == 1  # idle since 1000 s only


def test_activity_that_keeps_a_deployment_awake():
    rules = policy(scale_to_zero_after_s=60)
    unknown = Run(rules, 1)  # a ready pod whose /metrics gave nothing might be serving
    assert [unknown.at(t, [ready("a", None)]) for t in (0, 100, 200)] == [1, 1, 1]
    knocked = Run(rules, 1)  # requests at the activator count (it fronts a waking pod)
    assert knocked.at(0, [ready("a", IDLE)]) == 1
    assert knocked.at(61, [ready("a", IDLE)], demand_at=30) == 1
    assert knocked.at(91, [ready("a", IDLE)], demand_at=30) == 0
    never = Run(policy(), 1)  # no scaleToZeroAfterSeconds: minReplicas is the floor
    assert [never.at(t, [ready("a", IDLE)]) for t in (0, 10_000)] == [1, 1]


def test_the_memory_is_bounded():
    run = Run(policy(down_window_s=3600), 1)
    for step in range(3 * MAX_RECOMMENDATIONS):
        run.at(step * 0.1, share(0.8 * (1 + step % 7), max(1, run.replicas)))
    assert len(run.memory.recommendations) <= MAX_RECOMMENDATIONS
    folded = Run(policy(), 2)
    for t in range(100):
        folded.at(float(t), share(1.6, 2))
    assert len(folded.memory.recommendations) == 1  # one run of equal recommendations


def test_policy_from_the_spec():
    body = llmd_body(
        replicas=None,
        engine={"maxNumSeqs": 64, "maxNumBatchedTokens": 2048},
        readiness={"kvCacheThreshold": 0.9},
        autoscaling={"maxReplicas": 6, "scaleToZeroAfterSeconds": 600},
    )
    body["spec"].pop("replicas")
    spec = check_spec("llama", defaulted(body)["spec"]).spec
    assert spec is not None
    rules = Policy.from_spec(spec)
    assert (rules.min_replicas, rules.max_replicas, rules.targets) == (1, 6, {"saturation": 0.8})
    assert (rules.up_window_s, rules.down_window_s, rules.scale_to_zero_after_s) == (0, 300, 600)
    assert rules.limits == EngineLimits(0.9, 2048, 64)
    assert Policy.from_spec(spec, can_scale_to_zero=False).scale_to_zero_after_s is None


def _autoscaled(**spec) -> dict:
    body = llmd_body(**spec)
    if "replicas" not in spec:
        body["spec"].pop("replicas")
    return body


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        (
            {"replicas": 2, "autoscaling": {"maxReplicas": 4}},
            "spec.replicas and spec.autoscaling are mutually exclusive",
        ),
        (
            {"autoscaling": {"minReplicas": 5, "maxReplicas": 4}},
            "minReplicas must not exceed autoscaling.maxReplicas",
        ),
        ({"autoscaling": {"maxReplicas": 4, "targets": {}}}, "needs at least one of"),
        ({"autoscaling": {"maxReplicas": 4, "scaleUpStabilizationSeconds": 3601}}, "3600"),
        ({"autoscaling": {"maxReplicas": 0}}, "maxReplicas"),
        (
            {
                "autoscaling": {"maxReplicas": 4, "scaleToZeroAfterSeconds": 600},
                "routing": {"inferencePool": True, "endpointPicker": {"name": "epp"}},
            },
            "cannot be used with routing.inferencePool",
        ),
    ],
)
def test_admission_refuses_what_the_autoscaler_cannot_honour(spec, needle):
    body = _autoscaled(**spec)
    errors = validate_cr(body)
    assert any(needle in error for error in errors), errors
    problems = check_spec("llama", defaulted(body)["spec"]).problems
    assert problems and any(needle in p or "maxReplicas" in p for p in problems), problems


def test_kubectl_scale_on_an_autoscaled_deployment_is_refused():
    """``kubectl scale llmd`` writes spec.replicas through the scale subresource: the object
    it would store is refused with the message naming both fields."""
    body = _autoscaled(autoscaling={"maxReplicas": 4})
    assert validate_cr(body) == []
    assert defaulted(body)["spec"]["autoscaling"]["targets"] == {"saturation": 0.8}
    body["spec"]["replicas"] = 3  # what the scale subresource writes
    (error,) = validate_cr(body)
    assert "spec.replicas and spec.autoscaling are mutually exclusive" in error
    assert "kubectl scale" in error


def test_the_operator_reads_what_the_engine_exports():
    metrics = ServerMetrics("llama", max_model_len=4096)
    metrics.on_step(
        SchedulerStats(12, 6, 0.32, 0, 0, 0, num_steps=1),
        IterationStats(num_generation_tokens=12, num_prompt_tokens=7788),
    )
    sample = parse_sample(metrics.render().decode())
    assert sample is not None
    assert (sample.kv_cache_utilization, sample.waiting, sample.running) == (0.32, 6, 12)
    assert (sample.step_tokens, sample.steps) == (7800, 1)
