"""Speculative decoding with a draft model (``{"method": "draft_model"}``), offline ``LLM``.

Drafts come from real checkpoints written with ``save_pretrained``: the target itself (its
drafts are the target's own greedy tokens, so nearly all are accepted: any wrong draft KV,
say after preemption or from a prefix-cache hit, shows as rejections), a copy with noise
added to every weight (some accepted, some rejected), and a smaller model of another
architecture with the same vocabulary. Greedy output equals transformers token for token in
every case; with drafts replaced by placeholders (a failing draft model) too.
"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from metroline.engine import LLM, SamplingParams

from .conftest import MAX_NEW_TOKENS, make_prompts, shared_prefix_prompts

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
K = 4
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS)
#: Most rejected drafts when the target drafts for itself: the draft's single-token passes
#: and the target's verification round differently, which can flip a near tie.
SELF_DRAFT_MIN_ACCEPTANCE = 0.95


def _config(draft, k: int = K) -> dict:
    return {"method": "draft_model", "model": str(draft), "num_speculative_tokens": k}


def _llm(path, draft, **kwargs) -> LLM:
    kwargs.setdefault("kv_cache_memory_bytes", 4 * 2**20)
    return LLM(model=str(path), speculative_config=_config(draft), **kwargs)


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def _acceptance(llm: LLM) -> tuple[int, int]:
    stats = llm.engine_core.stats()
    return stats.spec_num_draft_tokens, stats.spec_num_accepted_tokens


@pytest.fixture(scope="module")
def noisy_copy(tmp_path_factory):
    """``noisy_copy(path)``: the checkpoint at ``path`` with Gaussian noise added to every
    weight, saved as a checkpoint of its own (cached)."""
    from transformers import AutoModelForCausalLM

    made = {}

    def make(path, std: float = 0.005):
        if (path, std) not in made:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
            generator = torch.Generator().manual_seed(7)
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * std)
            directory = tmp_path_factory.mktemp("noisy-draft")
            model.save_pretrained(str(directory))
            for tokenizer_file in path.glob("tokenizer*"):
                shutil.copy(tokenizer_file, directory)
            made[path, std] = directory
        return made[path, std]

    return make


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_transformers(arch, tiny_checkpoint, hf_greedy, noisy_copy):
    path = tiny_checkpoint(arch)
    prompts = make_prompts()
    expected = hf_greedy(path, prompts)
    llm = _llm(path, noisy_copy(path))
    assert _tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == expected
    drafted, accepted = _acceptance(llm)
    assert 0 < accepted < drafted  # both acceptance and rejection happened
    assert llm.engine_core.kv_cache_manager.usage == 0
    itself = _llm(path, path)
    assert _tokens(itself.generate(prompts, GREEDY, use_tqdm=False)) == expected
    drafted, accepted = _acceptance(itself)
    assert drafted > len(prompts) and accepted >= SELF_DRAFT_MIN_ACCEPTANCE * drafted


def test_smaller_draft_of_another_architecture(tiny_checkpoint, hf_greedy):
    path = tiny_checkpoint("llama")
    draft = tiny_checkpoint(
        "qwen3", seed=3, num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=64,
    )  # fmt: skip
    prompts = make_prompts()
    llm = _llm(path, draft)
    assert _tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == hf_greedy(path, prompts)
    assert _acceptance(llm)[0] > 0


def test_draft_kv_survives_prefix_caching_chunked_prefill_and_preemption(
    tiny_checkpoint, hf_greedy
):
    """The draft's KV shares the target's blocks: chunked prompts, preempted and resumed
    requests and prefix-cache hits all keep it right (the self-draft stays accepted)."""
    path = tiny_checkpoint("llama")
    prompts = shared_prefix_prompts() + make_prompts()
    expected = hf_greedy(path, prompts)
    probe = _llm(path, path, max_model_len=128)
    per_block = probe.engine_core.executor.worker.bytes_per_block()
    plain = LLM(model=str(path), max_model_len=128, kv_cache_memory_bytes=4 * 2**20)
    assert per_block == 2 * plain.engine_core.executor.worker.bytes_per_block()
    llm = _llm(
        path, path, max_model_len=128, kv_cache_memory_bytes=14 * per_block,
        enable_prefix_caching=True, max_num_batched_tokens=24,
    )  # fmt: skip
    assert _tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == expected
    stats = llm.engine_core.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert stats.num_prefill_steps > len(prompts)
    drafted, accepted = _acceptance(llm)
    assert accepted >= SELF_DRAFT_MIN_ACCEPTANCE * drafted
    assert llm.engine_core.kv_cache_manager.usage == 0
    # Prompts continuing the answers reuse the blocks written while drafting, the draft's
    # KV in them included: its proposals stay right.
    longer = [p + out[:24] for p, out in zip(prompts, expected)][:4]
    hits = stats.prefix_cache_hits
    assert _tokens(llm.generate(longer, GREEDY, use_tqdm=False)) == hf_greedy(path, longer)
    assert llm.engine_core.stats().prefix_cache_hits - hits > sum(len(p) for p in prompts[:4])
    more_drafted, more_accepted = _acceptance(llm)
    assert more_accepted - accepted >= SELF_DRAFT_MIN_ACCEPTANCE * (more_drafted - drafted)


def test_tensor_parallel_two_ranks(tiny_checkpoint, hf_greedy, noisy_copy):
    path = tiny_checkpoint("qwen3")
    prompts = make_prompts()
    llm = _llm(path, noisy_copy(path), tensor_parallel_size=2)
    try:
        assert _tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == hf_greedy(path, prompts)
        drafted, accepted = _acceptance(llm)
        assert 0 < accepted < drafted
    finally:
        llm.shutdown()


def test_sampling_verifies_draft_model_proposals(tiny_checkpoint):
    """Unseeded sampling accepts the draft's (one-hot) proposals by rejection sampling;
    seeded requests decode without drafts, exactly as without speculation."""
    path = tiny_checkpoint("llama")
    prompts = make_prompts()
    seeded = SamplingParams(temperature=1.0, seed=5, max_tokens=MAX_NEW_TOKENS)
    plain = LLM(model=str(path), kv_cache_memory_bytes=4 * 2**20)
    llm = _llm(path, path)
    want = plain.generate(prompts, seeded, use_tqdm=False)
    assert _tokens(llm.generate(prompts, seeded, use_tqdm=False)) == _tokens(want)
    assert _acceptance(llm) == (0, 0)
    cool = SamplingParams(temperature=0.3, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    llm.generate(prompts, cool, use_tqdm=False)
    drafted, accepted = _acceptance(llm)
    assert 0 < accepted <= drafted


def test_a_failing_draft_model_costs_only_its_drafts(tiny_checkpoint, hf_greedy, caplog):
    path = tiny_checkpoint("mistral")
    prompts = make_prompts()
    llm = _llm(path, path)
    drafter = llm.engine_core.executor.worker.model_runner.drafter

    def broken(scheduled, states):
        raise RuntimeError("injected draft failure")

    drafter._run = broken
    with caplog.at_level(logging.ERROR):
        got = _tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    assert got == hf_greedy(path, prompts)
    drafted, accepted = _acceptance(llm)
    assert drafted > 0 and accepted < drafted  # placeholders: only chance matches
    assert "injected draft failure" in caplog.text


def test_rejected_drafts_kv_is_recomputed_also_after_a_failed_proposal(tiny_checkpoint):
    """The target drafts for itself, but every step's third draft is corrupted: it is
    rejected, and its draft KV (written by the pass that fed it) must be recomputed. One
    proposal in the middle fails. The first two drafts stay accepted throughout: stale draft
    KV of a rejected token would make the draft's later proposals diverge."""
    path = tiny_checkpoint("llama")
    prompts = make_prompts((17, 31))
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    llm = _llm(path, path)
    drafter = llm.engine_core.executor.worker.model_runner.drafter
    run, greedy = drafter._run, drafter._greedy
    calls = {"run": 0, "pass": 0}

    def corrupting_greedy(hidden, num_rows):
        tokens = greedy(hidden, num_rows)
        calls["pass"] += 1
        return (tokens + 1) % 512 if calls["pass"] == 3 else tokens

    def failing_once(scheduled, states):
        calls["run"] += 1
        calls["pass"] = 0
        if calls["run"] == 6:
            raise RuntimeError("injected draft failure")
        return run(scheduled, states)

    drafter._greedy, drafter._run = corrupting_greedy, failing_once
    got = _tokens(llm.generate(prompts, params, use_tqdm=False))
    plain = LLM(model=str(path), kv_cache_memory_bytes=4 * 2**20)
    assert got == _tokens(plain.generate(prompts, params, use_tqdm=False))
    stats = llm.engine_core.stats()
    first, second = stats.spec_accepted_per_position[:2]
    assert stats.spec_accepted_per_position[2] == 0  # the corrupted draft, never accepted
    assert calls["run"] > 10
    # Every drafting step but the failed one (placeholders) accepts its first two drafts.
    assert first >= stats.spec_num_drafts - len(prompts) - 1
    assert second >= SELF_DRAFT_MIN_ACCEPTANCE * first


def test_a_pass_holds_at_most_max_pass_tokens(tiny_checkpoint, hf_greedy):
    """With a pass smaller than the step, requests catch up over several steps (verifying
    placeholders meanwhile); no pass exceeds the bound the memory profile ran."""
    path = tiny_checkpoint("qwen2")
    prompts = make_prompts()
    llm = _llm(path, path)
    drafter = llm.engine_core.executor.worker.model_runner.drafter
    drafter.max_pass_tokens = 8
    sizes = []
    forward = drafter._forward

    def spy(input_ids, positions, metadata):
        sizes.append(input_ids.shape[0])
        return forward(input_ids, positions, metadata)

    drafter._forward = spy
    assert _tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == hf_greedy(path, prompts)
    assert max(sizes) == 8
    drafted, accepted = _acceptance(llm)
    assert 0 < accepted < drafted  # caught up, then drafted right


def test_draft_model_config_refusals(tiny_checkpoint, tmp_path):
    from metroline.engine.config import EngineArgs

    path = str(tiny_checkpoint("llama"))

    def create(draft, **kwargs):
        return EngineArgs(model=path, speculative_config=_config(draft), **kwargs).create_config()

    config = create(path)
    assert config.draft is not None and config.draft.arch.vocab_size == 512
    plain = EngineArgs(model=path).create_config()
    assert config.kv_bytes_per_block == 2 * plain.kv_bytes_per_block
    with pytest.raises(ValueError, match="vocabulary"):
        create(tiny_checkpoint("llama", vocab_size=384))
    with pytest.raises(ValueError, match="draft model: tensor_parallel_size=2"):
        odd = tiny_checkpoint("llama", num_attention_heads=3, num_key_value_heads=1, hidden_size=48)
        create(odd, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="max_model_len"):
        create(tiny_checkpoint("llama", max_position_embeddings=64))
    with pytest.raises(ValueError, match="speculative_config model"):
        create(tmp_path / "missing")
    with pytest.raises(ValueError, match="async_scheduling"):
        create(path, async_scheduling=True)


def test_a_draft_with_another_vocabulary_mapping_is_warned_about(
    tiny_checkpoint, tmp_path, caplog
):
    """Same vocabulary size, tokens mapped to other ids: accepted (the output stays the
    target's) with a warning, since its drafts would rarely be accepted."""
    import json as json_module

    from metroline.engine.config import EngineArgs

    path = tiny_checkpoint("llama")
    draft = tmp_path / "draft"
    shutil.copytree(path, draft)
    tokenizer = json_module.loads((draft / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[20:22]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (draft / "tokenizer.json").write_text(json_module.dumps(tokenizer))
    with caplog.at_level(logging.WARNING):
        EngineArgs(model=str(path), speculative_config=_config(path)).create_config()
    assert "maps tokens to ids differently" not in caplog.text
    with caplog.at_level(logging.WARNING):
        EngineArgs(model=str(path), speculative_config=_config(draft)).create_config()
    assert "maps tokens to ids differently" in caplog.text

