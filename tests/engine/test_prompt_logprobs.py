"""``prompt_logprobs``: every prompt token's log-probability (and the top alternatives) equals
``log_softmax`` of transformers' logits, whole or over chunked prefill, and a request asking
for them computes its whole prompt even when the prefix cache holds it."""

from __future__ import annotations

import pytest
import torch

from metroline.engine import LLM, SamplingParams

from .conftest import make_prompts


@pytest.fixture(scope="module")
def path(tiny_checkpoint):
    return tiny_checkpoint("qwen3")


@pytest.fixture(scope="module")
def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def _check(entries, prompt, hf_model, num_top):
    with torch.no_grad():
        reference = torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0], dim=-1)
    assert len(entries) == len(prompt) and entries[0] is None
    for index in range(1, len(prompt)):
        entry, row, token = entries[index], reference[index - 1], prompt[index]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert entry[token].rank == int((row > row[token]).sum()) + 1
        top = row.topk(num_top)
        for rank, (value, top_id) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            assert entry[top_id].rank == rank + 1
            assert entry[top_id].logprob == pytest.approx(value, abs=1e-4)
        assert len(entry) in (num_top, num_top + 1)


@pytest.mark.parametrize("max_num_batched_tokens", [8192, 7])
def test_prompt_logprobs_equal_transformers(path, hf_model, max_num_batched_tokens):
    llm = LLM(
        model=str(path),
        kv_cache_memory_bytes=4 * 2**20,
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=4,
    )
    prompts = make_prompts([1, 17, 40], seed=81)
    params = [SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=k) for k in (2, 0, 5)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, output, k in zip(prompts, outputs, (2, 0, 5)):
        _check(output.prompt_logprobs, prompt, hf_model, k)
    plain = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert [o.prompt_logprobs for o in plain] == [None] * 3
    assert [o.outputs[0].token_ids for o in plain] == [o.outputs[0].token_ids for o in outputs]


def test_a_cached_prompt_is_computed_again_for_its_logprobs(path, hf_model):
    llm = LLM(model=str(path), kv_cache_memory_bytes=4 * 2**20, enable_prefix_caching=True)
    prompt = make_prompts([50], seed=82)[0]
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    hits = llm.engine_core.stats().prefix_cache_hits
    params = SamplingParams(max_tokens=2, prompt_logprobs=1, n=2)
    again = llm.generate([prompt], params, use_tqdm=False)[0]
    assert llm.engine_core.stats().prefix_cache_hits == hits + 48  # the sibling only
    _check(again.prompt_logprobs, prompt, hf_model, 1)
    assert again.num_cached_tokens == 48
    # Without prompt_logprobs the cache still serves the prompt.
    llm.generate([prompt], SamplingParams(max_tokens=2), use_tqdm=False)
    assert llm.engine_core.stats().prefix_cache_hits == hits + 2 * 48


def test_prompt_logprobs_survive_preemption(path, hf_model):
    probe = LLM(model=str(path), max_model_len=128, kv_cache_memory_bytes=4 * 2**20)
    per_block = probe.engine_core.executor.worker.bytes_per_block()
    probe.shutdown()
    llm = LLM(model=str(path), max_model_len=128, kv_cache_memory_bytes=10 * per_block)
    prompts = make_prompts([40, 45, 30], seed=83)
    outputs = llm.generate(
        prompts,
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, prompt_logprobs=1),
        use_tqdm=False,
    )
    assert llm.engine_core.stats().num_preemptions > 0
    for prompt, output in zip(prompts, outputs):
        _check(output.prompt_logprobs, prompt, hf_model, 1)
