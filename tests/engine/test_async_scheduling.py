"""Asynchronous scheduling (one step in flight) gives exactly the outputs of the plain
order: greedy equality with transformers under preemption, chunked prefill and prefix
caching, and identical results for seeded sampling, stop strings, stop ids, n and logprobs."""

from __future__ import annotations

import pytest

from metroline.engine import LLM, SamplingParams

from .conftest import MAX_NEW_TOKENS, make_prompts, shared_prefix_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS)


def _llm(path, asynchronous: bool, **kwargs) -> LLM:
    kwargs.setdefault("kv_cache_memory_bytes", 4 * 2**20)
    return LLM(model=str(path), async_scheduling=asynchronous, **kwargs)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_async_greedy_equals_transformers_under_pressure(arch, tiny_checkpoint, hf_greedy):
    path = tiny_checkpoint(arch)
    prompts = make_prompts() + shared_prefix_prompts()[:3]
    probe = _llm(path, True, max_model_len=128)
    per_block = probe.engine_core.executor.worker.bytes_per_block()
    llm = _llm(
        path,
        True,
        max_model_len=128,
        kv_cache_memory_bytes=14 * per_block,
        max_num_batched_tokens=24,
        enable_prefix_caching=True,
    )
    assert llm.engine_core.async_scheduling
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.engine_core.stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(path, prompts)
    assert llm.engine_core.kv_cache_manager.usage == 0
    assert not llm.engine_core.has_unfinished_requests()


def _mixed_params(tokenizer) -> list[SamplingParams]:
    stop_text = tokenizer.decode([300, 301])
    return [
        SamplingParams(temperature=0.9, seed=11, max_tokens=20),
        SamplingParams(temperature=1.2, top_p=0.8, top_k=20, seed=5, max_tokens=17, n=2),
        SamplingParams(temperature=0, max_tokens=30, stop=[stop_text, "e"]),
        SamplingParams(temperature=0, max_tokens=25, stop_token_ids=[7, 9, 11, 13]),
        SamplingParams(temperature=0.7, seed=3, max_tokens=12, logprobs=2),
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
    ]


def _summary(outputs):
    return [
        [(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason) for c in o.outputs]
        for o in outputs
    ]


def test_async_equals_sync_for_mixed_sampling(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    prompts = make_prompts((3, 17, 33, 8, 50, 21), seed=7)
    results = []
    for asynchronous in (False, True):
        llm = _llm(path, asynchronous, max_num_batched_tokens=40)
        params = _mixed_params(llm.get_tokenizer())
        outputs = llm.generate(prompts, params, use_tqdm=False)
        results.append((_summary(outputs), [o.outputs[0].logprobs for o in outputs]))
    assert results[0] == results[1]


def test_penalties_fall_back_to_the_plain_order(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    prompts = make_prompts((5, 19), seed=9)
    params = [
        SamplingParams(temperature=0, max_tokens=16, repetition_penalty=1.3),
        SamplingParams(temperature=0, max_tokens=16, min_tokens=10, stop_token_ids=[5]),
    ]
    plain = _summary(_llm(path, False).generate(prompts, params, use_tqdm=False))
    llm = _llm(path, True)
    assert _summary(llm.generate(prompts, params, use_tqdm=False)) == plain
    assert not llm.engine_core.scheduler.needs_exact_history()


def test_async_scheduling_default_is_on_for_cuda_only():
    from metroline.engine.core.engine_core import use_async_scheduling

    assert use_async_scheduling(None, "cuda")
    assert not use_async_scheduling(None, "cpu")
    assert use_async_scheduling(True, "cpu")
    assert not use_async_scheduling(False, "cuda")


def test_cpu_engine_runs_in_the_plain_order_by_default(tiny_checkpoint):
    assert not LLM(model=str(tiny_checkpoint("llama"))).engine_core.async_scheduling
