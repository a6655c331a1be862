"""Greedy tokens equal Hugging Face transformers ``generate()`` on the same checkpoints,
in one ``generate`` call, also with prefix sharing, preemption and chunked prefill."""

from __future__ import annotations

import pytest

from metroline.engine import LLM, SamplingParams

from .conftest import MAX_NEW_TOKENS, make_prompts, shared_prefix_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS)
ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


def _token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_transformers(arch, tiny_checkpoint, hf_greedy):
    path = tiny_checkpoint(arch)
    prompts = make_prompts()
    llm = LLM(model=str(path), kv_cache_memory_bytes=4 * 2**20, enable_prefix_caching=False)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert _token_ids(outputs) == hf_greedy(path, prompts)
    assert [o.prompt_token_ids for o in outputs] == prompts
    for output in outputs:
        completion = output.outputs[0]
        assert completion.finish_reason in ("stop", "length")
        if completion.finish_reason == "length":
            assert len(completion.token_ids) == MAX_NEW_TOKENS


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_caching_shared_prefixes(arch, tiny_checkpoint, hf_greedy):
    path = tiny_checkpoint(arch)
    prompts = shared_prefix_prompts() + make_prompts()
    llm = LLM(model=str(path), kv_cache_memory_bytes=4 * 2**20, enable_prefix_caching=True)
    first = llm.generate(prompts, GREEDY, use_tqdm=False)
    hits_first = llm.engine_core.stats().prefix_cache_hits
    # Same step: the duplicate and the other shared-prefix prompts reuse the first's blocks.
    assert hits_first >= 2 * 16
    second = llm.generate(prompts[::-1], GREEDY, use_tqdm=False)
    assert llm.engine_core.stats().prefix_cache_hits > hits_first + 16 * len(prompts) // 2
    expected = hf_greedy(path, prompts)
    assert _token_ids(first) == expected
    assert _token_ids(second) == expected[::-1]


@pytest.mark.parametrize("arch", ARCHS)
def test_preemption_by_recompute(arch, tiny_checkpoint, hf_greedy):
    path = tiny_checkpoint(arch)
    prompts = make_prompts()
    llm = _small_pool_llm(path, num_blocks=12)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.engine_core.stats().num_preemptions > 0
    assert _token_ids(outputs) == hf_greedy(path, prompts)
    assert llm.engine_core.kv_cache_manager.usage == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill(arch, tiny_checkpoint, hf_greedy):
    path = tiny_checkpoint(arch)
    prompts = make_prompts()
    llm = LLM(
        model=str(path),
        kv_cache_memory_bytes=4 * 2**20,
        max_num_batched_tokens=7,
        enable_prefix_caching=False,
    )
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert _token_ids(outputs) == hf_greedy(path, prompts)


def _small_pool_llm(path, num_blocks: int) -> LLM:
    probe = LLM(model=str(path), max_model_len=128, kv_cache_memory_bytes=4 * 2**20)
    per_block = probe.engine_core.executor.worker.bytes_per_block()
    return LLM(
        model=str(path),
        max_model_len=128,
        kv_cache_memory_bytes=num_blocks * per_block,
        enable_prefix_caching=True,
    )
