"""Speculative decoding's self-contained parts: config parsing, n-gram proposals, verification.

The statistical tests use fixed seeds (so they are deterministic) and a chi-square test at
p = 0.001 over a 5-token vocabulary; scipy is not installed, so the critical value for
4 degrees of freedom is hard-coded (18.467, the 0.999 quantile of chi-square(4)).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from metroline.engine.spec_decode import config as spec_config
from metroline.engine.spec_decode.config import (
    DRAFT_PAD_TOKEN,
    MAX_CONFIG_TEXT_BYTES,
    SpeculativeConfig,
    parse_speculative_config,
)
from metroline.engine.spec_decode.ngram import (
    MAX_LOOKUP_TOKENS,
    propose_ngram,
    propose_ngram_batch,
)
from metroline.engine.spec_decode.rejection import rejection_sample, verify_greedy

CHI2_CRITICAL_DF4_P001 = 18.467
VOCAB = 5

# ---------------------------------------------------------------- config


def test_ngram_config_from_dict_and_json():
    raw = {
        "method": "ngram",
        "num_speculative_tokens": 4,
        "prompt_lookup_min": 2,
        "prompt_lookup_max": 3,
    }
    expected = SpeculativeConfig("ngram", 4, prompt_lookup_min=2, prompt_lookup_max=3)
    assert parse_speculative_config(raw) == expected
    assert parse_speculative_config(json.dumps(raw)) == expected
    assert parse_speculative_config(expected) is expected
    for off in (None, "", "  ", "null"):
        assert parse_speculative_config(off) is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        expected.num_speculative_tokens = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("given", "low", "high"),
    [({}, 5, 5), ({"prompt_lookup_min": 3}, 3, 3), ({"prompt_lookup_max": 7}, 7, 7)],
)
def test_ngram_lookup_defaults_follow_vllm(given, low, high):
    parsed = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 2, **given})
    assert (parsed.prompt_lookup_min, parsed.prompt_lookup_max) == (low, high)


def test_draft_model_config_and_method_inference():
    parsed = parse_speculative_config(
        '{"method": "draft_model", "model": "/models/draft", "num_speculative_tokens": 3}'
    )
    assert parsed == SpeculativeConfig("draft_model", 3, model="/models/draft")
    # vLLM's older spellings: no method, the model names it.
    assert parse_speculative_config({"model": "/m", "num_speculative_tokens": 1}).method == (
        "draft_model"
    )
    inferred = parse_speculative_config({"model": "[ngram]", "num_speculative_tokens": 1})
    assert (inferred.method, inferred.model, inferred.prompt_lookup_min) == ("ngram", None, 5)


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ({"method": "eagle", "num_speculative_tokens": 2}, ["'eagle'", "not supported", "ngram"]),
        ({"method": "deepseek_mtp", "num_speculative_tokens": 2}, ["not supported"]),
        ({"method": "nope", "num_speculative_tokens": 2}, ["unknown method 'nope'", "draft_model"]),
        ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 4},
         ["'disable_by_batch_size'", "supported: method"]),
        ({"method": "ngram"}, ["num_speculative_tokens"]),
        ({"num_speculative_tokens": 2}, ["needs 'method'"]),
        ({"method": "ngram", "num_speculative_tokens": 0}, ["out of range [1, 16]"]),
        ({"method": "ngram", "num_speculative_tokens": 17}, ["out of range [1, 16]"]),
        ({"method": "ngram", "num_speculative_tokens": 2.0}, ["must be an integer"]),
        ({"method": "ngram", "num_speculative_tokens": True}, ["must be an integer"]),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0}, ["[1, 64]"]),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 65}, ["[1, 64]"]),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
          "prompt_lookup_max": 3}, ["prompt_lookup_min=4 must be <= prompt_lookup_max=3"]),
        ({"method": "ngram", "num_speculative_tokens": 2, "model": "/m"}, ["'model' does not"]),
        ({"method": "draft_model", "num_speculative_tokens": 2}, ["needs 'model'"]),
        ({"method": "draft_model", "model": "/m", "num_speculative_tokens": 2,
          "prompt_lookup_max": 3}, ["prompt_lookup_max apply only to method 'ngram'"]),
        ({"method": "draft_model", "model": "x" * 5000, "num_speculative_tokens": 2},
         ["longer than 4096"]),
    ],
)  # fmt: skip
def test_config_refusals_name_the_problem(raw, words):
    with pytest.raises(ValueError) as error:
        parse_speculative_config(raw)
    for word in words:
        assert word in str(error.value)


def test_config_text_refusals(monkeypatch):
    for bad, words in (("{", "not valid JSON"), ("[1]", "JSON object"), ("3", "JSON object")):
        with pytest.raises(ValueError, match=words):
            parse_speculative_config(bad)

    def no_parsing(_text):
        raise AssertionError("oversized text must be refused before it is parsed")

    monkeypatch.setattr(spec_config.json, "loads", no_parsing)
    huge = '{"method": "ngram", "num_speculative_tokens": 2' + " " * MAX_CONFIG_TEXT_BYTES + "}"
    with pytest.raises(ValueError, match="over 65536 bytes"):
        parse_speculative_config(huge)
    # Characters under the limit, UTF-8 bytes over it.
    with pytest.raises(ValueError, match="over 65536 bytes"):
        parse_speculative_config("é" * (MAX_CONFIG_TEXT_BYTES // 2 + 1))


# ---------------------------------------------------------------- n-gram


def _reference_ngram(tokens, k, min_n, max_n):
    """vLLM's rule written plainly: longest n first, earliest earlier occurrence."""
    window = list(tokens)[-MAX_LOOKUP_TOKENS:]
    length = len(window)
    for n in range(max_n, min_n - 1, -1):
        tail = window[length - n :] if n <= length else None
        for start in range(0, length - n):  # start < length - n: not the tail itself
            if window[start : start + n] == tail:
                return window[start + n : start + n + k]
    return []


def _propose(tokens, k=4, min_n=1, max_n=3):
    return propose_ngram(np.array(tokens, dtype=np.int64), k, min_n, max_n).tolist()


def test_ngram_hand_made_sequences():
    assert _propose([1, 2, 3, 4, 2, 3], k=4, min_n=2, max_n=3) == [4, 2, 3]  # vLLM's example
    assert _propose([1, 2, 3, 4, 1, 2, 3], k=2) == [4, 1]  # repeat: 3-gram [1, 2, 3]
    assert _propose([1, 2, 3, 4, 5]) == []  # no earlier occurrence
    assert _propose([1, 2, 3, 1], k=8) == [2, 3, 1]  # shorter tail than k: up to the end
    assert _propose([7, 7, 7], min_n=2, max_n=2) == [7]  # overlapping earlier occurrence
    assert _propose([5]) == [] and _propose([]) == []
    assert _propose([1, 2, 3, 1, 2], k=0) == []


def test_ngram_longest_match_wins_then_earliest():
    # [1, 2] occurs at 0 (followed by 9) and at 3 (followed by 8); [0, 1, 2] only at 2.
    sequence = [1, 2, 0, 1, 2, 8, 5, 0, 1, 2]
    assert _propose(sequence, k=2, min_n=1, max_n=3) == [8, 5]  # the 3-gram beats an earlier 2-gram
    assert _propose(sequence, k=2, min_n=1, max_n=2) == [0, 1]  # earliest 2-gram: at 0
    # min_n precedence: only a 1-gram matches, below min_n=2.
    assert _propose([4, 5, 6, 3, 6], k=2, min_n=1, max_n=3) == [3, 6]
    assert _propose([4, 5, 6, 3, 6], k=2, min_n=2, max_n=3) == []
    assert _propose([1, 2], k=2, min_n=3, max_n=3) == []  # shorter than min_n


def test_ngram_matches_the_plain_reference_on_random_sequences():
    rng = np.random.default_rng(0)
    for trial in range(300):
        length = int(rng.integers(0, 60))
        tokens = rng.integers(0, 1 + trial % 6, size=length)
        min_n = int(rng.integers(1, 4))
        max_n = int(rng.integers(min_n, 6))
        k = int(rng.integers(0, 6))
        got = propose_ngram(tokens.astype(np.int32), k, min_n, max_n)
        assert got.dtype == np.int64
        assert got.tolist() == _reference_ngram(tokens.tolist(), k, min_n, max_n), (
            tokens.tolist(),
            k,
            min_n,
            max_n,
        )


def test_ngram_searches_only_the_last_window():
    filler = np.arange(10, 10 + MAX_LOOKUP_TOKENS, dtype=np.int64)  # all distinct
    tail = np.array([1, 2, 3], dtype=np.int64)
    # The only earlier [1, 2, 3] lies just outside the window: nothing is proposed.
    outside = np.concatenate([tail, [4], filler[: MAX_LOOKUP_TOKENS - 3], tail])
    assert propose_ngram(outside, 2, 1, 3).tolist() == []
    # A sequence of exactly the window's length: the same occurrence is found.
    inside = np.concatenate([tail, [4], filler[: MAX_LOOKUP_TOKENS - 7], tail])
    assert inside.shape[0] == MAX_LOOKUP_TOKENS
    assert propose_ngram(inside, 2, 1, 3).tolist() == [4, 10]


def test_ngram_argument_checks():
    for k, min_n, max_n in ((-1, 1, 2), (17, 1, 2), (2, 0, 2), (2, 3, 2), (2, 1, 65)):
        with pytest.raises(ValueError):
            propose_ngram(np.array([1, 2, 1]), k, min_n, max_n)
    with pytest.raises(ValueError, match="1-D integer"):
        propose_ngram(np.array([1.0, 2.0]), 2, 1, 2)
    with pytest.raises(ValueError, match="1-D integer"):
        propose_ngram(np.array([[1, 2]]), 2, 1, 2)


def test_ngram_batch_pads_to_the_asked_width():
    sequences = [np.array([1, 2, 3, 1, 2]), np.array([1, 2, 3]), np.array([9, 9, 9, 9])]
    drafts, counts = propose_ngram_batch(sequences, 3, 1, 2)
    assert drafts.tolist() == [[3, 1, 2], [-1, -1, -1], [9, 9, -1]]
    assert counts.tolist() == [3, 0, 2]
    drafts, counts = propose_ngram_batch(sequences, [1, 2, 0], 1, 2)
    assert drafts.tolist() == [[3, -1], [-1, -1], [-1, -1]] and counts.tolist() == [1, 0, 0]
    drafts, counts = propose_ngram_batch([], 4, 1, 2)
    assert drafts.shape == (0, 4) and counts.shape == (0,)


# ---------------------------------------------------------------- greedy verification


def test_verify_greedy_prefix_then_correction_or_bonus():
    target = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8]])
    drafts = torch.tensor([[5, 6, 7], [5, 0, 7], [1, 6, 7], [5, 6, 7], [5, 6, -1]])
    num_drafts = torch.tensor([3, 3, 3, 1, 2])
    out = verify_greedy(target, drafts, num_drafts)
    assert out.num_accepted.tolist() == [3, 1, 0, 1, 2]
    assert out.to_lists() == [[5, 6, 7, 8], [5, 6], [5], [5, 6], [5, 6, 7]]
    # Drafts past num_drafts never count, even where they equal the argmax (row 3).
    assert out.token_ids[3].tolist() == [5, 6, DRAFT_PAD_TOKEN, DRAFT_PAD_TOKEN]


def test_verify_greedy_without_drafts_and_shape_checks():
    out = verify_greedy(torch.tensor([[4], [9]]), torch.empty(2, 0, dtype=torch.long),
                        torch.zeros(2, dtype=torch.long))  # fmt: skip
    assert out.to_lists() == [[4], [9]]
    with pytest.raises(ValueError, match="K\\+1"):
        verify_greedy(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long),
                      torch.zeros(2, dtype=torch.long))  # fmt: skip
    with pytest.raises(ValueError, match="num_drafts"):
        verify_greedy(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long),
                      torch.zeros(3, dtype=torch.long))  # fmt: skip


# ---------------------------------------------------------------- rejection sampling


def _chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=VOCAB).double()
    expected = probs.double() * tokens.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def _position_distributions(num_positions: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(num_positions, VOCAB, generator=generator), dim=-1)


@pytest.mark.parametrize("deterministic", [False, True], ids=["draft_q", "one_hot"])
def test_rejection_sampling_keeps_the_target_distribution(deterministic):
    """Context-free targets (position j always ``p_j``) with K=2: the first emitted token is
    ``p_0``-distributed, the second (where the first draft was accepted) ``p_1``, the third
    (the bonus after two accepted drafts) ``p_2``."""
    trials, width = 200_000, 2
    p = _position_distributions(width + 1, seed=1)
    q = _position_distributions(width, seed=2)
    generator = torch.Generator().manual_seed(3)
    if deterministic:  # any draft choice that ignores the verifier's randomness
        drafts = torch.randint(0, VOCAB, (trials, width), generator=generator)
        draft_probs = None
    else:
        drafts = torch.stack(
            [torch.multinomial(q[j], trials, replacement=True, generator=generator)
             for j in range(width)], dim=1,
        )  # fmt: skip
        draft_probs = q.expand(trials, width, VOCAB)
    target = p.expand(trials, width + 1, VOCAB)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        out = rejection_sample(target, drafts, draft_probs, torch.full((trials,), width))
    accepted, tokens = out.num_accepted, out.token_ids
    assert ((tokens >= 0).sum(dim=1) == accepted + 1).all()
    for position in range(width + 1):
        emitted = tokens[accepted >= position, position]
        assert emitted.numel() > 5_000
        assert _chi_square(emitted, p[position]) < CHI2_CRITICAL_DF4_P001, position
    # The test has power: the first token is far from the draft's own distribution.
    assert _chi_square(tokens[:, 0], q[0] if not deterministic else torch.full((VOCAB,), 0.2)) > 100


def test_rejection_sampling_without_drafts_samples_the_target():
    trials = 100_000
    p = _position_distributions(1, seed=5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(6)
        out = rejection_sample(
            p.expand(trials, 1, VOCAB), torch.empty(trials, 0, dtype=torch.long), None,
            torch.zeros(trials, dtype=torch.long),
        )  # fmt: skip
    assert (out.num_accepted == 0).all()
    assert _chi_square(out.token_ids[:, 0], p[0]) < CHI2_CRITICAL_DF4_P001


def test_one_hot_targets_reduce_to_greedy_verification():
    generator = torch.Generator().manual_seed(7)
    argmax = torch.randint(0, VOCAB, (64, 4), generator=generator)
    drafts = torch.where(torch.rand(64, 3, generator=generator) < 0.7, argmax[:, :3], 0)
    num_drafts = torch.randint(0, 4, (64,), generator=generator)
    one_hot = torch.nn.functional.one_hot(argmax, VOCAB).float()
    greedy = verify_greedy(argmax, drafts, num_drafts)
    for draft_probs in (None, torch.full((64, 3, VOCAB), 1.0 / VOCAB)):
        sampled = rejection_sample(one_hot, drafts, draft_probs, num_drafts)
        assert torch.equal(sampled.token_ids, greedy.token_ids)


def _seeded_run(seeds, extra_rows: int = 0) -> torch.Tensor:
    p = _position_distributions(4, seed=8)
    q = _position_distributions(3, seed=9)
    rows = len(seeds) + extra_rows
    drafts = torch.tensor([[0, 1, 2]]).expand(rows, 3)
    generators = [torch.Generator().manual_seed(s) for s in seeds] + [None] * extra_rows
    return torch.cat([
        rejection_sample(p.expand(rows, 4, VOCAB), drafts, q.expand(rows, 3, VOCAB),
                         torch.full((rows,), 3), generators).token_ids
        for _ in range(5)  # five steps: each generator's stream advances the same way
    ], dim=1)[: len(seeds)]  # fmt: skip


def test_seeded_requests_are_reproducible_and_batch_independent():
    first = _seeded_run([11, 12, 13])
    assert torch.equal(first, _seeded_run([11, 12, 13]))
    assert not torch.equal(first, _seeded_run([21, 22, 23]))
    # A seeded request's tokens do not depend on the unseeded rows beside it.
    assert torch.equal(first, _seeded_run([11, 12, 13], extra_rows=5))


def test_rejection_sample_shape_checks():
    p = torch.full((2, 3, VOCAB), 1.0 / VOCAB)
    drafts = torch.zeros(2, 2, dtype=torch.long)
    counts = torch.full((2,), 2)
    with pytest.raises(ValueError, match="draft_probs"):
        rejection_sample(p, drafts, torch.ones(2, 3, VOCAB), counts)
    with pytest.raises(ValueError, match="one generator"):
        rejection_sample(p, drafts, None, counts, [None])
    with pytest.raises(ValueError, match="target_probs"):
        rejection_sample(p[0], drafts, None, counts)
