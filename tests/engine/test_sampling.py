"""Sampling: seeds, top-k/top-p/min-p, penalties, stop strings and ids, min_tokens, n, logprobs."""

from __future__ import annotations

import pytest
import torch

from metroline.engine import LLM, SamplingParams
from metroline.engine.layers.sampler import (
    SamplingMetadata,
    apply_penalties,
    apply_top_k_top_p_min_p,
)

from .conftest import make_prompts


@pytest.fixture(scope="module")
def llm(tiny_checkpoint) -> LLM:
    return LLM(model=str(tiny_checkpoint("llama")), kv_cache_memory_bytes=4 * 2**20)


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint("llama")), dtype=torch.float32)


def _tokens(llm, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_seed_gives_same_tokens_whatever_the_batch(llm):
    prompt = make_prompts([20], seed=5)[0]
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=24)
    alone = _tokens(llm, [prompt], seeded)[0]
    others = make_prompts([3, 40, 17, 60], seed=9)
    mixed_params = [
        SamplingParams(temperature=0.8, max_tokens=30),
        SamplingParams(temperature=0, max_tokens=5),
        seeded,
        SamplingParams(temperature=1.3, top_p=0.9, seed=7, max_tokens=12),
        SamplingParams(temperature=1.0, top_k=5, presence_penalty=0.5, max_tokens=20),
    ]
    batch = [others[0], others[1], prompt, others[2], others[3]]
    assert _tokens(llm, batch, mixed_params)[2] == alone
    assert _tokens(llm, [prompt, prompt], [seeded, seeded.clone(seed=99)])[0] == alone
    assert _tokens(llm, [prompt], seeded.clone(seed=4321))[0] != alone


def test_top_k_one_equals_greedy(llm):
    prompts = make_prompts([1, 9, 33], seed=3)
    greedy = _tokens(llm, prompts, SamplingParams(temperature=0, max_tokens=16))
    top1 = _tokens(llm, prompts, SamplingParams(temperature=1.5, top_k=1, max_tokens=16))
    assert top1 == greedy


def test_unseeded_sampling_varies_and_respects_top_k(llm, hf_model):
    prompt = make_prompts([12], seed=8)[0]
    params = SamplingParams(temperature=2.0, top_k=3, max_tokens=1, n=40, seed=None)
    first_tokens = {
        o.token_ids[0] for o in llm.generate([prompt], params, use_tqdm=False)[0].outputs
    }
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt])).logits[0, -1]
    allowed = set(logits.topk(3).indices.tolist())
    assert first_tokens <= allowed and len(first_tokens) > 1


def _reference_penalties(logits, outputs, prompt, presence, frequency, repetition):
    logits = logits.clone()
    for token in set(outputs) | set(prompt):
        if repetition != 1:
            value = logits[token]
            logits[token] = value / repetition if value > 0 else value * repetition
    for token in set(outputs):
        count = outputs.count(token)
        logits[token] -= frequency * count + presence
    return logits


def _meta(rows, vocab, **extra) -> SamplingMetadata:
    defaults = dict(
        temperature=torch.ones(rows),
        greedy=torch.zeros(rows, dtype=torch.bool),
        all_greedy=False,
        top_k=None,
        top_p=None,
        min_p=None,
        presence_penalty=None,
        frequency_penalty=None,
        repetition_penalty=None,
        output_token_counts=None,
        prompt_token_mask=None,
        generators={},
        max_num_logprobs=None,
    )
    defaults.update(extra)
    return SamplingMetadata(**defaults)


def test_penalties_match_reference():
    generator = torch.Generator().manual_seed(0)
    vocab = 50
    logits = torch.randn(3, vocab, generator=generator) * 3
    outputs = [[1, 2, 2, 7], [], [4, 4, 4, 9, 1]]
    prompts = [[3, 1], [5, 6, 7], [9]]
    settings = [(0.5, 0.3, 1.2), (1.0, -0.5, 0.7), (-0.2, 1.1, 1.0)]
    counts = torch.zeros(3, vocab)
    prompt_mask = torch.zeros(3, vocab, dtype=torch.bool)
    for row in range(3):
        for token in outputs[row]:
            counts[row, token] += 1
        prompt_mask[row, prompts[row]] = True
    meta = _meta(
        3,
        vocab,
        presence_penalty=torch.tensor([s[0] for s in settings]),
        frequency_penalty=torch.tensor([s[1] for s in settings]),
        repetition_penalty=torch.tensor([s[2] for s in settings]),
        output_token_counts=counts,
        prompt_token_mask=prompt_mask,
    )
    got = apply_penalties(logits, meta)
    for row in range(3):
        expected = _reference_penalties(logits[row], outputs[row], prompts[row], *settings[row])
        torch.testing.assert_close(got[row], expected)


def test_top_k_top_p_min_p_match_reference():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 30, generator=generator) * 2
    top_k = torch.tensor([3, 30, 30, 5])
    top_p = torch.tensor([1.0, 0.5, 1.0, 0.8])
    min_p = torch.tensor([0.0, 0.0, 0.2, 0.1])
    got = apply_top_k_top_p_min_p(logits, _meta(4, 30, top_k=top_k, top_p=top_p, min_p=min_p))
    for row in range(4):
        probs = torch.softmax(logits[row], dim=-1)
        keep = set(range(30))
        keep &= {i for i in range(30) if probs[i] >= min_p[row] * probs.max()}
        keep &= set(logits[row].topk(int(top_k[row])).indices.tolist())
        masked = torch.full_like(logits[row], float("-inf"))
        idx = sorted(keep)
        masked[idx] = logits[row][idx]
        order = masked.argsort(descending=True).tolist()
        probs = torch.softmax(masked, dim=-1)
        nucleus, mass = set(), 0.0
        for token in order:
            if mass >= top_p[row]:
                break
            nucleus.add(token)
            mass += float(probs[token])
        kept = {i for i in range(30) if got[row, i] != float("-inf")}
        assert kept == nucleus


@pytest.mark.parametrize(
    "penalties",
    [
        dict(repetition_penalty=1.5),
        dict(frequency_penalty=0.8, presence_penalty=0.4),
        dict(repetition_penalty=0.8, frequency_penalty=-0.3, presence_penalty=1.0),
    ],
)
def test_greedy_with_penalties_matches_reference_decoding(llm, hf_model, penalties):
    prompts = make_prompts([6, 20], seed=11)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, **penalties)
    got = _tokens(llm, prompts, params)
    for prompt, tokens in zip(prompts, got):
        outputs: list[int] = []
        for _ in range(20):
            with torch.no_grad():
                logits = hf_model(torch.tensor([prompt + outputs])).logits[0, -1]
            logits = _reference_penalties(
                logits,
                outputs,
                prompt,
                penalties.get("presence_penalty", 0.0),
                penalties.get("frequency_penalty", 0.0),
                penalties.get("repetition_penalty", 1.0),
            )
            outputs.append(int(logits.argmax()))
        assert tokens == outputs


def test_stop_string_across_token_boundary(llm):
    tokenizer = llm.get_tokenizer()
    prompt = make_prompts([10], seed=21)[0]
    base = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)
    tokens = base[0].outputs[0].token_ids
    texts = [tokenizer.decode(tokens[: i + 1]) for i in range(len(tokens))]
    # Find a boundary where both neighbouring tokens decode to printable text.
    for k in range(5, len(tokens) - 1):
        left, right = texts[k - 1], texts[k]
        if len(right) > len(left) and left and "\ufffd" not in right:
            stop = left[-1] + right[len(left)]
            break
    else:
        pytest.skip("no clean token boundary in this continuation")
    full = base[0].outputs[0].text
    out = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=40, stop=[stop]), use_tqdm=False
    )[0].outputs[0]
    assert out.text == full[: full.find(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert stop not in out.text
    assert len(out.token_ids) < len(tokens)


def test_stop_token_ids_and_min_tokens(llm):
    prompt = make_prompts([14], seed=31)[0]
    base = _tokens(llm, [prompt], SamplingParams(temperature=0, max_tokens=20))[0]
    stop_id = base[3]
    first = base.index(stop_id)
    out = llm.generate(
        [prompt],
        SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id]),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.token_ids == base[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    # min_tokens bans the stop id until enough tokens exist.
    out = llm.generate(
        [prompt],
        SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id], min_tokens=8),
        use_tqdm=False,
    )[0].outputs[0]
    assert stop_id not in out.token_ids[:7]
    assert len(out.token_ids) >= 8


def test_max_tokens_and_ignore_eos(llm):
    prompts = make_prompts([3, 30], seed=41)
    outs = llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=7, ignore_eos=True), use_tqdm=False
    )
    for out in outs:
        assert len(out.outputs[0].token_ids) == 7 and out.outputs[0].finish_reason == "length"
    outs = llm.generate([prompts[0]], SamplingParams(max_tokens=None), use_tqdm=False)
    assert outs[0].outputs[0].finish_reason in ("stop", "length")


def test_logprobs_are_raw_model_logprobs(llm, hf_model):
    prompt = make_prompts([9], seed=51)[0]
    out = llm.generate(
        [prompt], SamplingParams(temperature=0.7, seed=3, max_tokens=4, logprobs=3), use_tqdm=False
    )[0].outputs[0]
    assert len(out.logprobs) == 4
    context = list(prompt)
    total = 0.0
    for token, position in zip(out.token_ids, out.logprobs):
        with torch.no_grad():
            ref = torch.log_softmax(hf_model(torch.tensor([context])).logits[0, -1], dim=-1)
        assert token in position and 3 <= len(position) <= 4
        top = ref.topk(3)
        for rank, (value, tid) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            assert position[tid].rank == rank + 1
            assert position[tid].logprob == pytest.approx(value, abs=1e-4)
        assert position[token].logprob == pytest.approx(float(ref[token]), abs=1e-4)
        assert position[token].rank == int((ref > ref[token]).sum()) + 1
        assert position[token].decoded_token == llm.get_tokenizer().decode([token])
        total += position[token].logprob
        context.append(token)
    assert out.cumulative_logprob == pytest.approx(total, abs=1e-4)


def test_n_sequences_share_prompt_blocks(tiny_checkpoint):
    llm = LLM(
        model=str(tiny_checkpoint("llama")),
        kv_cache_memory_bytes=4 * 2**20,
        enable_prefix_caching=False,
    )
    prompt = make_prompts([70], seed=61)[0]
    params = SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=6)
    processed = llm.input_processor.process("shared", prompt, params, 0.0)
    for request in processed.core_requests:
        llm.engine_core.add_request(request)
    llm.engine_core.step()
    kv = llm.engine_core.kv_cache_manager
    tables = [
        kv.block_ids(llm.engine_core.scheduler.requests[r.request_id])
        for r in processed.core_requests
    ]
    full_blocks = 69 // 16
    assert all(t[:full_blocks] == tables[0][:full_blocks] for t in tables)
    assert len({t[full_blocks] for t in tables}) == 4  # the partial block is private
    llm.engine_core.finish_requests([r.request_id for r in processed.core_requests])
    assert kv.usage == 0
    outs = llm.generate([prompt], params, use_tqdm=False)[0].outputs
    assert [o.index for o in outs] == [0, 1, 2, 3]
    assert len({tuple(o.token_ids) for o in outs}) > 1  # seeds seed+i differ
    greedy = llm.generate(
        [prompt], SamplingParams(n=3, temperature=0, max_tokens=6), use_tqdm=False
    )
    assert len({tuple(o.token_ids) for o in greedy[0].outputs}) == 1
