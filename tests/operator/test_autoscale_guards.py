"""The autoscaler's guards (issue 22 review): untrusted figures never overflow or stop a
decision, light traffic and waiting wake-ups count as activity, the scale-down branch never
asks for more, and a new leadership term starts from the live Deployment. Time is injected,
never slept; pages are parsed by the real ``parse_sample``."""

from __future__ import annotations

import json
import math

import pytest

from metroline.operator import constants as c
from metroline.operator.autoscale import (
    MAX_RECOMMENDATION,
    UNSCHEDULABLE,
    Memory,
    PodLoad,
    PodState,
    decide,
    recommend,
)
from metroline.operator.cache import ClusterCache
from metroline.operator.config import OperatorConfig
from metroline.operator.controller import Controller
from metroline.operator.kvmetrics import KvScraper, PodSample, parse_sample
from metroline.operator.scaler import Scaler

from .conftest import llmd_body
from .test_autoscale import IDLE, Run, policy, ready

KEY = ("ml", "llama")


def test_huge_and_non_finite_figures_neither_overflow_nor_reach_the_status():
    rules = policy(max_replicas=4, targets={"saturation": 0.8, "waitingRequestsPerReplica": 1e-300})
    huge = PodLoad(0.5, 1e308, 1e308, math.inf, 1e-300)
    decision = decide(rules, 1, [ready("a", huge), ready("b", PodLoad(math.nan, 0, 1))],
                      Memory(), now=0)  # fmt: skip
    assert decision.desired == 4 and decision.limited[0] == "TooManyReplicas"
    json.dumps(decision.signals, allow_nan=False)  # the status patch takes it
    assert recommend([1e300], 1e-300, 1, 1) == MAX_RECOMMENDATION
    page = "".join(
        f"{name} {value}\n"
        for name, value in (
            (c.KV_METRIC, 0.5),
            (c.WAITING_METRIC, 1e308),
            (c.RUNNING_METRIC, 3),
            (c.RUNNING_METRIC, 1e308),
            (f"{c.STEP_TOKENS_METRIC}_count", "+Inf"),
        )
    )
    assert parse_sample(page) == PodSample(0.5, None, 3.0, None, None)


def test_steps_between_scrapes_are_activity():
    run = Run(policy(scale_to_zero_after_s=60), 1)
    light = [ready("a", PodLoad(0.05, 0, 0, tokens_per_step=40, steps=3))]  # gauges at 0
    assert [run.at(t, light) for t in (0, 61, 122, 183)] == [1, 1, 1, 1]
    assert run.at(243, [ready("a", IDLE)]) == 0  # 60 s without a step


def test_an_unschedulable_pod_after_a_wake_up_is_activity_until_the_activation_timeout():
    run = Run(policy(scale_to_zero_after_s=60, activation_timeout_s=300), 0)
    assert run.at(10, [], demand_at=10) == 1 and run.last.reason == "Activated"
    waiting = [PodState("a", UNSCHEDULABLE)]
    assert [run.at(t, waiting) for t in (80, 200, 309)] == [1, 1, 1]
    assert run.at(369, waiting) == 0  # timed out at 310 s, then idle for 60 s


def test_the_scale_down_branch_never_asks_for_more_than_current():
    # One measured pod far below target and two starting ones: the HPA formula says 3.
    assert recommend([0.1], 0.8, 3, 1) == 1


class Pages:
    """The scrape the scaler asks for, answered from Prometheus text the test sets (parsed
    by the real ``parse_sample``)."""

    def __init__(self) -> None:
        self.page = f"{c.KV_METRIC} 0.1\n{c.RUNNING_METRIC} 0\n{c.WAITING_METRIC} 0\n"

    async def samples(self, pods) -> dict[str, PodSample]:
        return {p["metadata"]["name"]: parse_sample(self.page) for p in pods}


def _cluster(live_replicas: int) -> ClusterCache:
    cache = ClusterCache()
    body = llmd_body("llama", autoscaling={"minReplicas": 1, "maxReplicas": 3,
                                           "scaleToZeroAfterSeconds": 60})  # fmt: skip
    body["spec"].pop("replicas")
    body["metadata"]["namespace"] = "ml"
    cache.put_llmd(body)
    owner = {"apiVersion": f"{c.GROUP}/{c.VERSION}", "kind": c.KIND, "name": "llama",
             "controller": True, "uid": "u"}  # fmt: skip
    meta = {"name": "llama", "namespace": "ml", "ownerReferences": [owner]}
    cache.put_child({"kind": "Deployment", "metadata": meta, "spec": {"replicas": live_replicas}})
    return cache


def _scaler(cache: ClusterCache, clock: list[float]) -> Scaler:
    config = OperatorConfig(pod_ip="10.0.0.5", activator_port=0)
    return Scaler(cache, Pages(), config, record=lambda *_: None, clock=lambda: "",  # type: ignore[arg-type]
                  enqueue=lambda _: None, leading=lambda: True,
                  monotonic=lambda: clock[0])  # fmt: skip


@pytest.mark.asyncio
async def test_a_new_term_starts_from_the_live_deployment():
    cache, clock = _cluster(live_replicas=1), [0.0]
    scaler = _scaler(cache, clock)
    await scaler.sample({})
    clock[0] = 100.0
    await scaler.sample({})  # idle for 100 s: this term decided 0
    spec = scaler_spec(cache)
    assert scaler.replicas(KEY, spec) == 0
    scaler.reset()  # lost leadership; another leader woke it; this replica leads again
    cache.put_child({**cache.child(KEY, "Deployment"), "spec": {"replicas": 2}})
    assert scaler.replicas(KEY, spec) == 2
    clock[0] = 110.0
    await scaler.sample({})  # a fresh window: not back to 0 at once
    assert scaler.replicas(KEY, spec) == 2


@pytest.mark.asyncio
async def test_a_tick_across_a_change_of_term_decides_nothing():
    cache, clock = _cluster(live_replicas=1), [0.0]
    scaler = _scaler(cache, clock)

    class Late(Pages):
        async def samples(self, pods):
            scaler.reset()  # leadership changed hands while this scrape ran
            return await super().samples(pods)

    scaler.scraper = Late()  # type: ignore[assignment]
    assert await scaler.sample({}) == [] and scaler._decisions == {}


@pytest.mark.asyncio
async def test_the_controller_resets_the_autoscaler_on_every_change_of_leadership():
    controller = Controller(KvScraper(), OperatorConfig(engine_image="e:1"))  # type: ignore[arg-type]
    scaler = controller.scaler
    scaler._desired[KEY] = 0
    controller._on_leadership(False)
    assert scaler._desired == {}
    scaler._desired[KEY] = 0
    scaler._steps["uid"] = (1.0, 1.0)
    controller._on_leadership(True)
    controller._takeover.cancel()
    assert scaler._desired == {} and scaler._steps == {}


@pytest.mark.asyncio
async def test_a_stale_desired_count_keeps_within_the_current_bounds():
    cache, clock = _cluster(live_replicas=1), [0.0]
    scaler = _scaler(cache, clock)
    scaler._desired[KEY] = 7  # decided under an older spec with a higher maxReplicas
    assert scaler.replicas(KEY, scaler_spec(cache)) == 3


@pytest.mark.asyncio
async def test_a_held_request_is_activity_at_every_tick():
    cache, clock = _cluster(live_replicas=1), [0.0]
    scaler = _scaler(cache, clock)
    await scaler.sample({})
    scaler.activator._held_by[KEY] += 1  # a request waits at the activator
    clock[0] = 100.0
    await scaler.sample({})
    assert scaler.replicas(KEY, scaler_spec(cache)) == 1


@pytest.mark.asyncio
async def test_one_failing_decision_leaves_the_others_and_the_loop_alive(caplog):
    cache, clock = _cluster(live_replicas=1), [0.0]
    scaler = _scaler(cache, clock)
    scaler.monotonic = lambda: 1 / 0  # a bug in the decision
    assert await scaler.sample({}) == []
    assert "autoscaling ml/llama failed" in caplog.text


def scaler_spec(cache: ClusterCache):
    from metroline.operator.scaler import autoscaled

    return autoscaled(cache.llmd(KEY))


@pytest.mark.asyncio
async def test_a_failing_tick_is_logged_and_never_raised(caplog):
    controller = Controller(KvScraper(), OperatorConfig(engine_image="e:1"))  # type: ignore[arg-type]

    async def broken(kv):
        raise OverflowError("cannot convert float infinity to integer")

    controller.scaler.sample = broken  # type: ignore[method-assign]
    await controller.sample_kv()  # the KV loop's body: it survives
    assert "autoscaling tick failed" in caplog.text
