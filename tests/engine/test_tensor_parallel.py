"""Tensor parallelism on CPU (gloo): same greedy tokens as TP=1 and transformers; worker
processes never outlive the engine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from metroline.engine import LLM, SamplingParams

from .conftest import MAX_NEW_TOKENS, make_prompts, shared_prefix_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS)


def _tokens(llm, prompts):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tp2_matches_tp1_and_transformers(arch, tiny_checkpoint, hf_greedy):
    path = tiny_checkpoint(arch)
    prompts = make_prompts() + shared_prefix_prompts()[:3]
    kwargs = dict(
        kv_cache_memory_bytes=4 * 2**20, enable_prefix_caching=True, max_num_batched_tokens=24
    )
    llm = LLM(model=str(path), tensor_parallel_size=2, **kwargs)
    try:
        tp2 = _tokens(llm, prompts)
        assert llm.engine_core.stats().prefix_cache_hits > 0
    finally:
        llm.shutdown()
    tp1 = _tokens(LLM(model=str(path), **kwargs), prompts)
    assert tp2 == tp1 == hf_greedy(path, prompts)


def test_tp2_async_scheduling_matches_transformers_under_pressure(tiny_checkpoint, hf_greedy):
    """Plans run one step ahead of the tokens; workers take them from rank 0's broadcast.
    Preemption, chunked prefill and prefix hits all happen while a step is in flight."""
    path = tiny_checkpoint("llama")
    prompts = make_prompts() + shared_prefix_prompts()[:3]
    probe = LLM(model=str(path), max_model_len=128, kv_cache_memory_bytes=2**20)
    per_block_tp1 = probe.engine_core.executor.worker.bytes_per_block()
    probe.shutdown()
    llm = LLM(
        model=str(path),
        tensor_parallel_size=2,
        async_scheduling=True,
        max_model_len=128,
        kv_cache_memory_bytes=7 * per_block_tp1,  # 14 blocks of half the bytes per rank
        max_num_batched_tokens=24,
        enable_prefix_caching=True,
    )
    try:
        assert llm.engine_core.async_scheduling and llm.engine_core.num_blocks == 14
        greedy = _tokens(llm, prompts)
        stats = llm.engine_core.stats()
        assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
        seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=12)
        sampled = [o.outputs[0].token_ids for o in llm.generate(prompts[:4], seeded)]
    finally:
        llm.shutdown()
    assert greedy == hf_greedy(path, prompts)
    reference = LLM(model=str(path), max_model_len=128, async_scheduling=False)
    assert sampled == [o.outputs[0].token_ids for o in reference.generate(prompts[:4], seeded)]


def test_tp4_replicates_kv_heads(tiny_checkpoint, hf_greedy):
    path = tiny_checkpoint("llama")  # 4 query heads, 2 KV heads: each KV head on 2 ranks
    prompts = make_prompts((3, 17, 40))
    llm = LLM(model=str(path), tensor_parallel_size=4, kv_cache_memory_bytes=4 * 2**20)
    try:
        assert llm.engine_core.executor.worker.kv_heads_per_rank == 1
        assert _tokens(llm, prompts) == hf_greedy(path, prompts)
    finally:
        llm.shutdown()


ENGINE_SCRIPT = """
import os, sys, time
from metroline.engine import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], tensor_parallel_size=2, kv_cache_memory_bytes=2**20)
    pids = [h.process.pid for h in llm.engine_core.executor.workers]
    print("WORKERS", *pids, flush=True)
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)
    print("READY", flush=True)
    how = sys.argv[2]
    if how == "exit":
        sys.exit(0)
    if how == "raise":
        raise RuntimeError("boom")
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is dead but not yet reaped
        return stat.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.parametrize("how", ["exit", "raise", "sigterm", "sigkill"])
def test_workers_die_with_the_engine(how, tiny_checkpoint, tmp_path):
    script = tmp_path / "engine.py"
    script.write_text(textwrap.dedent(ENGINE_SCRIPT))
    process = subprocess.Popen(
        [sys.executable, "-P", str(script), str(tiny_checkpoint("llama")), how],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    workers: list[int] = []
    for line in process.stdout:
        if line.startswith("WORKERS"):
            workers = [int(p) for p in line.split()[1:]]
        if line.startswith("READY"):
            break
    assert len(workers) == 1 and all(_alive(p) for p in workers)
    if how == "sigterm":
        process.send_signal(signal.SIGTERM)
    elif how == "sigkill":
        process.kill()
    process.wait(timeout=60)
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers), f"orphan workers after {how}"


def test_tp8_with_four_kv_heads(tiny_checkpoint, hf_greedy):
    """TP above the KV-head count (issue 8's case) on CPU: 8 ranks, 4 KV heads."""
    path = tiny_checkpoint("llama", hidden_size=64, num_attention_heads=8, num_key_value_heads=4)
    prompts = make_prompts((5, 21))
    llm = LLM(model=str(path), tensor_parallel_size=8, kv_cache_memory_bytes=2**20)
    try:
        assert llm.engine_core.executor.worker.kv_heads_per_rank == 1
        params = SamplingParams(temperature=0, max_tokens=12)
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert tokens == hf_greedy(path, prompts, 12)
    finally:
        llm.shutdown()


def test_failed_start_raises_the_real_error_and_leaves_no_worker(tiny_checkpoint, monkeypatch):
    import multiprocessing

    from metroline.engine.worker import executor

    def broken_worker(*args, **kwargs):
        raise RuntimeError("rank 0 could not load")

    monkeypatch.setattr(executor, "Worker", broken_worker)
    with pytest.raises(RuntimeError, match="rank 0 could not load"):
        LLM(model=str(tiny_checkpoint("llama")), tensor_parallel_size=2)
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("metroline-tp")]


def test_a_worker_dying_at_start_fails_the_engine_at_once(tiny_checkpoint, monkeypatch):
    """Before, rank 0 waited in the rendezvous for the collective timeout (10 minutes)."""
    from metroline.engine.worker.executor import WorkerFailedError

    # Only worker processes read this variable, before they join the group: a bad value
    # makes rank 1 die while starting.
    monkeypatch.setenv("METROLINE_HANG_DUMP_S", "not-a-number")
    started = time.monotonic()
    with pytest.raises(WorkerFailedError, match="worker 1 exited while starting"):
        LLM(model=str(tiny_checkpoint("llama")), tensor_parallel_size=2)
    assert time.monotonic() - started < 60
