"""Speculative decoding end to end (offline ``LLM``): greedy output with drafts equals
transformers token for token on the four architectures, with the n-gram proposer and with
drafts replayed from a first pass (a share of them corrupted, so both acceptance and
rejection happen by construction); with prefix caching, chunked prefill and preemption; at
TP=2; seeded sampling reproducible; log-probs, stops and ``max_tokens`` as without drafts;
requests that need exact history decode without drafts; the counters and metrics."""

from __future__ import annotations

import json

import pytest

from metroline.benchmarks.spec_replay import ReplayProposer
from metroline.engine import LLM, SamplingParams

from .conftest import MAX_NEW_TOKENS, make_prompts, shared_prefix_prompts

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
K = 4
NGRAM = {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 1,
         "prompt_lookup_max": 3}  # fmt: skip
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS)
VOCAB = 512


def _prompts() -> list[list[int]]:
    """Random prompts, and prompts that repeat a phrase (n-gram lookups find matches)."""
    prompts = make_prompts()
    return prompts + [p[:6] * 5 for p in prompts[:4]]


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def _spec_llm(path, **kwargs) -> LLM:
    kwargs.setdefault("kv_cache_memory_bytes", 4 * 2**20)
    return LLM(model=str(path), speculative_config=NGRAM, **kwargs)


def _replay(llm: LLM, prompts, outputs, share: float) -> None:
    """Drafts replayed from ``outputs`` with ``share`` of them corrupted."""
    proposer = ReplayProposer(zip(prompts, outputs), VOCAB, corrupt_share=share, seed=1)
    llm.engine_core.scheduler.speculation.propose = proposer


def _counts(llm: LLM) -> tuple[int, int, int]:
    stats = llm.engine_core.stats()
    return stats.spec_num_drafts, stats.spec_num_draft_tokens, stats.spec_num_accepted_tokens


@pytest.mark.parametrize("arch", ARCHS)
def test_ngram_greedy_equals_transformers(arch, tiny_checkpoint, hf_greedy):
    path = tiny_checkpoint(arch)
    prompts = _prompts()
    llm = _spec_llm(path)
    assert _tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == hf_greedy(path, prompts)
    num_drafts, num_draft_tokens, num_accepted = _counts(llm)
    assert num_drafts > 0 and num_draft_tokens >= num_drafts
    assert 0 <= num_accepted <= num_draft_tokens
    assert llm.engine_core.kv_cache_manager.usage == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_replayed_drafts_accept_and_reject_exactly(arch, tiny_checkpoint, hf_greedy):
    path = tiny_checkpoint(arch)
    prompts = make_prompts()
    expected = hf_greedy(path, prompts)
    for share, accepted_all in ((0.0, True), (0.3, False)):
        llm = _spec_llm(path)
        _replay(llm, prompts, expected, share)
        assert _tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == expected
        _, num_draft_tokens, num_accepted = _counts(llm)
        assert num_draft_tokens > 0
        if accepted_all:
            assert num_accepted == num_draft_tokens
            # One target step per K + 1 tokens (the bonus token after K accepted drafts).
            per_position = llm.engine_core.stats().spec_accepted_per_position
            assert per_position[0] >= per_position[-1] > 0
        else:
            assert 0 < num_accepted < num_draft_tokens


def test_with_prefix_caching_chunked_prefill_and_preemption(tiny_checkpoint, hf_greedy):
    path = tiny_checkpoint("llama")
    prompts = shared_prefix_prompts() + make_prompts()
    expected = hf_greedy(path, prompts)
    probe = LLM(model=str(path), max_model_len=128, kv_cache_memory_bytes=4 * 2**20)
    per_block = probe.engine_core.executor.worker.bytes_per_block()
    llm = _spec_llm(
        path,
        max_model_len=128,
        kv_cache_memory_bytes=14 * per_block,
        enable_prefix_caching=True,
        max_num_batched_tokens=24,
    )
    _replay(llm, prompts, expected, 0.3)
    assert _tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == expected
    stats = llm.engine_core.stats()
    assert stats.num_preemptions > 0
    assert stats.prefix_cache_hits > 0
    assert stats.num_prefill_steps > len(prompts)  # prompts ran in chunks
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    assert llm.engine_core.kv_cache_manager.usage == 0
    # Prompts that continue the answers hit the blocks speculative steps filled with them:
    # only real tokens were hashed, and their KV is right.
    longer = [p + out[:24] for p, out in zip(prompts, expected)][:4]
    hits = llm.engine_core.stats().prefix_cache_hits
    assert _tokens(llm.generate(longer, GREEDY, use_tqdm=False)) == hf_greedy(path, longer)
    assert llm.engine_core.stats().prefix_cache_hits - hits > sum(len(p) for p in prompts[:4])


def test_tensor_parallel_two_ranks(tiny_checkpoint, hf_greedy):
    path = tiny_checkpoint("qwen3")
    prompts = _prompts()
    expected = hf_greedy(path, prompts)
    llm = _spec_llm(path, tensor_parallel_size=2)
    try:
        _replay(llm, prompts, expected, 0.3)
        assert _tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == expected
        assert _counts(llm)[2] > 0
    finally:
        llm.shutdown()


def test_seeded_sampling_draws_as_without_speculation(tiny_checkpoint, hf_greedy):
    """Seeded sampling requests never draft: their tokens are those of the engine without
    speculation, whatever else the batch holds; unseeded ones verify drafts by rejection
    sampling."""
    path = tiny_checkpoint("llama")
    prompts = _prompts()
    greedy = hf_greedy(path, prompts)
    seeded = SamplingParams(temperature=1.0, seed=5, max_tokens=MAX_NEW_TOKENS, n=2)
    cool = SamplingParams(temperature=0.3, max_tokens=MAX_NEW_TOKENS)
    plain = LLM(model=str(path), kv_cache_memory_bytes=4 * 2**20, max_num_batched_tokens=12)
    alone = plain.generate(prompts[-1:], seeded, use_tqdm=False)[0]
    llm = _spec_llm(path, max_num_batched_tokens=12)
    _replay(llm, prompts, greedy, 0.0)
    mixed = llm.generate(prompts, [GREEDY] * (len(prompts) - 1) + [seeded], use_tqdm=False)
    assert [c.token_ids for c in mixed[-1].outputs] == [c.token_ids for c in alone.outputs]
    assert _tokens(mixed[:-1]) == greedy[:-1]
    before = _counts(llm)[2]
    # Cool unseeded sampling mostly follows the greedy path: replayed drafts are accepted.
    llm.generate(prompts, cool, use_tqdm=False)
    assert _counts(llm)[2] > before


def test_logprobs_stops_and_max_tokens_as_without_drafts(tiny_checkpoint, hf_greedy):
    path = tiny_checkpoint("qwen3")
    prompts = make_prompts()
    full = hf_greedy(path, prompts)
    # A stop token from inside each output (drafts run past it), and a short max_tokens.
    stops = sorted({out[len(out) // 2] for out in full if len(out) > 4})[:3]
    plain = LLM(model=str(path), kv_cache_memory_bytes=4 * 2**20)
    texts = [o.outputs[0].text for o in plain.generate(prompts, GREEDY, use_tqdm=False)]
    strings = [t[len(t) // 2 : len(t) // 2 + 3] for t in texts if len(t) > 8][:4]
    cases = [
        SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS, logprobs=3),
        SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS, stop_token_ids=stops),
        SamplingParams(temperature=0, max_tokens=7),
        # Stop strings end the text inside a step's several tokens: the tokens after the one
        # that completed the string are not the output's.
        SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS, logprobs=1, stop=strings),
    ]
    for params in cases:
        llm = _spec_llm(path)
        _replay(llm, prompts, full, 0.3)
        got = llm.generate(prompts, params, use_tqdm=False)
        want = plain.generate(prompts, params, use_tqdm=False)
        assert _tokens(got) == _tokens(want)
        assert [(o.outputs[0].finish_reason, o.outputs[0].text) for o in got] == [
            (o.outputs[0].finish_reason, o.outputs[0].text) for o in want
        ]
        assert _counts(llm)[2] > 0
        if params.logprobs is None:
            continue
        for g, w in zip(got, want):
            for got_entry, want_entry in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
                assert got_entry.keys() == want_entry.keys()
                for token, logprob in want_entry.items():
                    assert got_entry[token].rank == logprob.rank
                    assert got_entry[token].logprob == pytest.approx(logprob.logprob, abs=1e-4)
            assert len(g.outputs[0].logprobs) == len(g.outputs[0].token_ids)
            assert g.outputs[0].cumulative_logprob == pytest.approx(
                w.outputs[0].cumulative_logprob, abs=1e-3
            )


def test_requests_needing_exact_history_decode_without_drafts(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    prompts = _prompts()
    params = [
        SamplingParams(temperature=0, max_tokens=16, presence_penalty=0.5),
        SamplingParams(temperature=0, max_tokens=16, min_tokens=4),
        SamplingParams(temperature=0, max_tokens=16),
    ] * 4
    params = params[: len(prompts)]
    llm = _spec_llm(path)
    drafted = []
    ngram = llm.engine_core.scheduler.speculation.propose

    def spy(request, room):
        drafted.append(request.sampling_params)
        return ngram(request, room)

    llm.engine_core.scheduler.speculation.propose = spy
    got = _tokens(llm.generate(prompts, params, use_tqdm=False))
    plain = LLM(model=str(path), kv_cache_memory_bytes=4 * 2**20)
    assert got == _tokens(plain.generate(prompts, params, use_tqdm=False))
    assert drafted
    assert all(not p.uses_penalties and p.min_tokens == 0 for p in drafted)


def test_config_through_engine_args_and_refusals(tiny_checkpoint):
    from metroline.engine.config import EngineArgs

    path = str(tiny_checkpoint("llama"))
    config = EngineArgs(model=path, speculative_config=json.dumps(NGRAM)).create_config()
    assert config.speculative.num_speculative_tokens == K
    with pytest.raises(ValueError, match="async_scheduling"):
        EngineArgs(model=path, speculative_config=NGRAM, async_scheduling=True).create_config()
    unknown = {**NGRAM, "acceptance_method": "x"}
    with pytest.raises(ValueError, match="unsupported key"):
        EngineArgs(model=path, speculative_config=unknown).create_config()


def test_metrics_count_drafts_and_accepted_positions():
    from prometheus_client.parser import text_string_to_metric_families

    from metroline.engine.client.request_events import IterationStats
    from metroline.engine.messages import SchedulerStats
    from metroline.engine.server.metrics import ServerMetrics

    metrics = ServerMetrics("m", 128)
    for drafts, tokens, accepted, positions in ((2, 6, 3, (2, 1, 0)), (5, 14, 7, (4, 2, 1))):
        stats = SchedulerStats(
            1, 0, 0.0, 0, 0, 0, spec_num_drafts=drafts, spec_num_draft_tokens=tokens,
            spec_num_accepted_tokens=accepted, spec_accepted_per_position=positions,
        )  # fmt: skip
        metrics.on_step(stats, IterationStats())
    values = {
        (s.name, s.labels.get("position")): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }
    assert values[("metroline:spec_decode_num_drafts_total", None)] == 5
    assert values[("metroline:spec_decode_num_draft_tokens_total", None)] == 14
    assert values[("metroline:spec_decode_num_accepted_tokens_total", None)] == 7
    per_pos = "metroline:spec_decode_num_accepted_tokens_per_pos_total"
    assert [values[(per_pos, str(p))] for p in range(3)] == [4, 2, 1]


def test_drafts_never_preempt_another_requests_next_token():
    """Two decoding requests, one free block: the one whose next token starts a block gets
    it; the other's drafts, which would need it too, are dropped (no preemption)."""
    from metroline.engine.config import SchedulerConfig
    from metroline.engine.core.kv_cache import KVCacheManager
    from metroline.engine.core.request import Request
    from metroline.engine.core.scheduler import Scheduler
    from metroline.engine.messages import EngineCoreRequest, ModelRunnerOutput
    from metroline.engine.spec_decode.config import SpeculativeConfig

    kv = KVCacheManager(num_blocks=3, block_size=4, enable_prefix_caching=False)
    spec = SpeculativeConfig("ngram", K, prompt_lookup_min=1, prompt_lookup_max=3)
    scheduler = Scheduler(SchedulerConfig(8, 64, 64), kv, spec)
    scheduler.speculation.propose = lambda request, room: [7] * room
    params = SamplingParams(temperature=0, max_tokens=16)
    for request_id, prompt in (("a", [5, 6, 7]), ("b", [5, 6, 7, 8])):
        scheduler.add_request(Request(EngineCoreRequest(request_id, prompt, params)))
    first = scheduler.schedule()  # both prompts: one block each
    assert not first.spec_token_ids
    scheduler.update_from_output(first, ModelRunnerOutput({"a": 9, "b": 9}, {}))
    second = scheduler.schedule()  # a's next token fits its block; b's starts a new one
    assert not second.preempted_request_ids
    assert second.num_scheduled_tokens == {"a": 1, "b": 1}
    assert not second.spec_token_ids
    assert kv.num_free_blocks == 0
