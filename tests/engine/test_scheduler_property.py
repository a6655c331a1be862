"""Property-based test of the scheduler and KV cache manager.

Random sequences of add / step / finish / abort run against a fake worker that mirrors the
scheduler's plan (new requests whole, running ones as diffs). After every operation the
invariants hold; at the end every block is free and no request is left.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from metroline.engine.config import SchedulerConfig
from metroline.engine.core.kv_cache import KVCacheManager
from metroline.engine.core.request import Request
from metroline.engine.core.scheduler import Scheduler
from metroline.engine.messages import (
    EngineCoreRequest,
    ModelRunnerOutput,
    RequestStatus,
    SchedulerOutput,
)
from metroline.engine.sampling_params import SamplingParams

BLOCK_SIZE = 4
MAX_MODEL_LEN = 48
EOS = 0


class MirrorWorker:
    """What a worker would know: rebuilt only from scheduler outputs."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.blocks: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}

    def apply(self, out: SchedulerOutput) -> None:
        for request_id in out.finished_request_ids | out.preempted_request_ids:
            self.tokens.pop(request_id, None)
            self.blocks.pop(request_id, None)
        for new in out.new_requests:
            self.tokens[new.request_id] = list(new.token_ids)
            self.blocks[new.request_id] = list(new.block_ids)
            self.computed[new.request_id] = new.num_computed_tokens
        for cached in out.running_requests:
            self.tokens[cached.request_id].extend(cached.new_token_ids)
            self.blocks[cached.request_id].extend(cached.new_block_ids)
            self.computed[cached.request_id] = cached.num_computed_tokens


def check_invariants(scheduler: Scheduler, kv: KVCacheManager) -> None:
    config = scheduler.config
    assert len(scheduler.running) <= config.max_num_seqs
    ids_running = {r.request_id for r in scheduler.running}
    ids_waiting = {r.request_id for r in scheduler.waiting}
    assert not ids_running & ids_waiting
    assert ids_running | ids_waiting == set(scheduler.requests)
    refs: dict[int, int] = {}
    for request_id, blocks in kv.req_blocks.items():
        assert request_id in scheduler.requests
        for block in blocks:
            refs[block.block_id] = refs.get(block.block_id, 0) + 1
    for block in kv.pool.blocks:
        assert block.ref_cnt == refs.get(block.block_id, 0)
        assert (block.ref_cnt == 0) == (block.block_id in kv.pool._free)
    for request in scheduler.running:
        held = len(kv.req_blocks.get(request.request_id, []))
        assert held * BLOCK_SIZE >= request.num_computed_tokens
        assert request.num_computed_tokens <= request.num_tokens <= MAX_MODEL_LEN
    for request in scheduler.waiting:
        assert request.request_id not in kv.req_blocks or not kv.req_blocks[request.request_id]


class Stepper:
    """Drives the scheduler like the engine core: plain (schedule, run, update), or
    asynchronous (schedule and launch step N+1, then update with step N's tokens)."""

    def __init__(self, scheduler: Scheduler, asynchronous: bool, rng: random.Random) -> None:
        self.scheduler = scheduler
        self.asynchronous = asynchronous
        self.rng = rng
        self.worker = MirrorWorker()
        self.in_flight: tuple | None = None

    def step(self) -> None:
        scheduler = self.scheduler
        out = scheduler.schedule()
        assert out.total_num_scheduled_tokens <= scheduler.config.max_num_batched_tokens
        self.worker.apply(out)
        sampled = {}
        for request_id, count in out.num_scheduled_tokens.items():
            request = scheduler.requests[request_id]
            assert count > 0
            known = self.worker.tokens[request_id]
            assert known == request.all_token_ids
            assert self.worker.blocks[request_id] == scheduler.kv_cache_manager.block_ids(request)
            start = self.worker.computed[request_id]
            assert start + count == request.num_computed_tokens
            # At most the one token being sampled by the step in flight is unknown.
            assert start + count <= len(known) + request.num_pending_samples
            assert request.num_pending_samples <= 1 + int(self.asynchronous)
        for request_id in out.sampling_request_ids:
            sampled[request_id] = self.rng.choice([EOS, *range(1, 20)])
        if not self.asynchronous:
            scheduler.update_from_output(out, ModelRunnerOutput(sampled, {}))
            return
        previous, self.in_flight = self.in_flight, (out, sampled)
        if previous is not None:
            scheduler.update_from_output(previous[0], ModelRunnerOutput(previous[1], {}))

    def drain(self) -> None:
        if self.in_flight is not None:
            out, sampled = self.in_flight
            self.in_flight = None
            self.scheduler.update_from_output(out, ModelRunnerOutput(sampled, {}))


operation = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 30), st.booleans()),
    st.tuples(st.just("add"), st.integers(13, 30), st.integers(1, 8), st.just(True)),
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("abort"), st.integers(0, 30)),
    st.tuples(st.just("stop"), st.integers(0, 30)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(operation, min_size=8, max_size=40),
    num_blocks=st.integers(MAX_MODEL_LEN // BLOCK_SIZE, 20),
    budget=st.integers(1, 64),
    max_seqs=st.integers(1, 6),
    prefix_caching=st.booleans(),
    asynchronous=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_workloads_leave_nothing_behind(
    ops, num_blocks, budget, max_seqs, prefix_caching, asynchronous, seed
):
    rng = random.Random(seed)
    kv = KVCacheManager(num_blocks, BLOCK_SIZE, prefix_caching)
    config = SchedulerConfig(
        max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=MAX_MODEL_LEN
    )
    scheduler = Scheduler(config, kv)
    stepper = Stepper(scheduler, asynchronous, rng)
    shared_prefix = [rng.randrange(1, 20) for _ in range(12)]
    added = []
    for op in ops:
        if op[0] == "add":
            _, length, max_tokens, share = op
            length = min(length, MAX_MODEL_LEN - 1)
            prompt = (shared_prefix if share else [])[:length]
            prompt = prompt + [rng.randrange(1, 20) for _ in range(length - len(prompt))]
            request_id = f"r{len(added)}"
            added.append(request_id)
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=rng.random() < 0.5)
            scheduler.add_request(
                Request(EngineCoreRequest(request_id, prompt, params, eos_token_ids=(EOS,)))
            )
        elif op[0] == "step":
            for _ in range(op[1]):
                stepper.step()
        elif added:
            target = added[op[1] % len(added)]
            status = (
                RequestStatus.FINISHED_ABORTED
                if op[0] == "abort"
                else RequestStatus.FINISHED_STOPPED
            )
            scheduler.finish_requests([target], status)
        check_invariants(scheduler, kv)
    for _ in range(10_000):
        if not scheduler.has_unfinished_requests():
            break
        stepper.step()
        check_invariants(scheduler, kv)
    stepper.drain()
    assert not scheduler.has_unfinished_requests()
    assert kv.pool.num_free_blocks == num_blocks
    assert not kv.req_blocks and not kv.num_cached_blocks
    assert kv.usage == 0
    event(f"preemptions: {min(scheduler.num_preemptions, 3)}")
    event(f"asynchronous: {asynchronous}")
    event(f"prefix hits: {kv.prefix_cache_hits > 0}")
    # Workers are told to drop every request they were sent.
    stepper.step()
    stepper.drain()
    assert not stepper.worker.tokens
