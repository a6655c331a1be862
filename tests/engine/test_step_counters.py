"""The scheduler's step counters (steps, prompt-chunk steps, scheduled tokens) that the
benchmarks report: exact on a plan whose steps are known in advance, in both step orders."""

from __future__ import annotations

import pytest

from metroline.engine import LLM, SamplingParams

from .conftest import make_prompts


@pytest.mark.parametrize("asynchronous", [False, True])
def test_step_counters_count_every_planned_step(tiny_checkpoint, asynchronous):
    llm = LLM(
        model=str(tiny_checkpoint("llama")),
        kv_cache_memory_bytes=4 * 2**20,
        max_num_batched_tokens=10,
        async_scheduling=asynchronous,
    )
    # Prompts of 5 and 9 tokens under a 10-token budget: step 1 runs 5 + 5 (the second
    # prompt chunked), step 2 decodes the first and finishes the second prompt (1 + 4), steps
    # 3 and 4 decode both (2 + 2) and step 5 the second alone (1): 20 tokens in 5 steps.
    prompts = make_prompts((5, 9), seed=3)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [4, 4]
    stats = llm.engine_core.stats()
    assert (stats.num_steps, stats.num_prefill_steps, stats.num_scheduled_tokens) == (5, 2, 20)
