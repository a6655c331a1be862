"""vLLM's logits-processing fields, each against a PyTorch reference on transformers' logits:
``logit_bias``, ``allowed_token_ids``, ``bad_words``; and ``include_stop_str_in_output``
(stop strings and stop tokens keep their text only with it)."""

from __future__ import annotations

import pytest
import torch

from metroline.engine import LLM, SamplingParams

from .conftest import make_prompts


@pytest.fixture(scope="module")
def path(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def llm(path) -> LLM:
    return LLM(model=str(path), kv_cache_memory_bytes=4 * 2**20)


@pytest.fixture(scope="module")
def async_llm(path) -> LLM:
    return LLM(model=str(path), kv_cache_memory_bytes=4 * 2**20, async_scheduling=True)


@pytest.fixture(scope="module")
def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def _greedy_reference(hf_model, prompt, steps, transform) -> list[int]:
    """Greedy decoding where ``transform(logits, output_so_far)`` edits each step's logits."""
    context, output = list(prompt), []
    for _ in range(steps):
        with torch.no_grad():
            logits = hf_model(torch.tensor([context])).logits[0, -1].clone()
        token = int(transform(logits, output).argmax())
        context.append(token)
        output.append(token)
    return output


def _run(llm, prompt, **params):
    params.setdefault("temperature", 0)
    return llm.generate([prompt], SamplingParams(**params), use_tqdm=False)[0].outputs[0]


def test_logit_bias_matches_reference_and_forces_a_token(llm, hf_model):
    prompt = make_prompts([11], seed=71)[0]
    with torch.no_grad():
        first = hf_model(torch.tensor([prompt])).logits[0, -1]
    top, second = first.topk(2).indices.tolist()
    bias = {second: 4.0, top: -3.0, 7: 1.5}

    def biased(logits, _output):
        for token, value in bias.items():
            logits[token] += value
        return logits

    expected = _greedy_reference(hf_model, prompt, 8, biased)
    out = _run(llm, prompt, max_tokens=8, ignore_eos=True, logit_bias=bias)
    assert out.token_ids == expected
    assert out.token_ids[0] == second  # the bias changed the first token
    # JSON sends keys as strings; +100 forces a token.
    forced = _run(llm, prompt, max_tokens=5, ignore_eos=True, logit_bias={"9": 100})
    assert forced.token_ids == [9] * 5


def test_allowed_token_ids_restrict_greedy_and_sampling(llm, hf_model):
    prompt = make_prompts([9], seed=72)[0]
    allowed = sorted(set(make_prompts([30], seed=73)[0]))

    def restricted(logits, _output):
        banned = torch.ones_like(logits, dtype=torch.bool)
        banned[allowed] = False
        return logits.masked_fill(banned, float("-inf"))

    expected = _greedy_reference(hf_model, prompt, 8, restricted)
    out = _run(llm, prompt, max_tokens=8, ignore_eos=True, allowed_token_ids=allowed)
    assert out.token_ids == expected
    sampled = llm.generate(
        [prompt],
        SamplingParams(temperature=1.5, n=8, seed=5, max_tokens=6, allowed_token_ids=allowed),
        use_tqdm=False,
    )[0]
    tokens = {t for o in sampled.outputs for t in o.token_ids}
    assert tokens <= set(allowed) and len(tokens) > 1


def _two_token_word(tokenizer, tokens: list[int]) -> str:
    """The text of two neighbouring ``tokens`` whose tokenisation is those two tokens."""
    for i in range(len(tokens) - 1):
        word = tokenizer.decode(tokens[i : i + 2])
        if (
            word.strip() == word
            and tokenizer.encode(word, add_special_tokens=False) == tokens[i : i + 2]
        ):
            return word
    raise AssertionError(f"no two-token word in {tokens}")


def _bad_word_sequences(tokenizer, word: str) -> list[list[int]]:
    plain = tokenizer.encode(word, add_special_tokens=False)
    spaced = tokenizer.encode(" " + word, add_special_tokens=False)
    same_shape = len(spaced) == len(plain) and spaced[0] != plain[0]
    return [plain, spaced] if same_shape else [plain]


def _contains(tokens: list[int], sequence: list[int]) -> bool:
    n = len(sequence)
    return any(tokens[i : i + n] == sequence for i in range(len(tokens) - n + 1))


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_bad_words_are_never_generated(llm, async_llm, hf_model, async_scheduling):
    engine = async_llm if async_scheduling else llm
    tokenizer = llm.get_tokenizer()
    prompt = make_prompts([12], seed=60)[0]
    base = _run(engine, prompt, max_tokens=24, ignore_eos=True).token_ids
    word = _two_token_word(tokenizer, base)
    single = tokenizer.decode([base[0]])
    sequences = _bad_word_sequences(tokenizer, word)
    if single.strip():
        sequences += _bad_word_sequences(tokenizer, single.strip())

    def without_bad_words(logits, output):
        for sequence in sequences:
            *prefix, last = sequence
            if not prefix or output[len(output) - len(prefix) :] == prefix:
                logits[last] = float("-inf")
        return logits

    expected = _greedy_reference(hf_model, prompt, 24, without_bad_words)
    words = [word, single.strip()] if single.strip() else [word]
    out = _run(engine, prompt, max_tokens=24, ignore_eos=True, bad_words=words)
    assert out.token_ids == expected
    assert out.token_ids != base
    assert not any(_contains(out.token_ids, s) for s in sequences)
    assert _contains(base, sequences[0])  # the ban had something to do


def _single_token_words(tokenizer, tokens: list[int]) -> list[str]:
    """Words of ``tokens`` that are one token both alone and after a space."""
    words = []
    for token in tokens:
        word = tokenizer.decode([token]).strip()
        if (
            word
            and word not in words
            and all(
                len(tokenizer.encode(text, add_special_tokens=False)) == 1
                for text in (word, " " + word)
            )
        ):
            words.append(word)
    return words


def test_single_token_bad_words_keep_asynchronous_scheduling(llm, async_llm, hf_model):
    """Only single-token bad words: the engine stays asynchronous (no exact history), the
    banned tokens never appear, and the other rows of the batch are unchanged."""
    tokenizer = llm.get_tokenizer()
    prompts = make_prompts([12, 7, 20], seed=60)
    free = [_run(llm, p, max_tokens=24, ignore_eos=True).token_ids for p in prompts]
    words = _single_token_words(tokenizer, free[0])[:2]
    assert words, free[0]
    banned = {t for w in words for seq in _bad_word_sequences(tokenizer, w) for t in seq}
    core = async_llm.engine_core
    probe = SamplingParams(temperature=0, bad_words=words)
    core.add_request(
        async_llm.input_processor.process("probe", prompts[0], probe, 0.0).core_requests[0]
    )
    assert core.async_scheduling and not core.scheduler.needs_exact_history()
    core.finish_requests(["probe"])

    def without(logits, _output):
        logits[sorted(banned)] = float("-inf")
        return logits

    params = [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, bad_words=words),
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
    ]
    outs = [o.outputs[0].token_ids for o in async_llm.generate(prompts, params, use_tqdm=False)]
    assert outs[0] == _greedy_reference(hf_model, prompts[0], 24, without)
    assert outs[0] != free[0] and not banned & set(outs[0])
    assert outs[1:] == free[1:]


def _stop_string(llm, prompt) -> tuple[str, str]:
    """A continuation's text and a two-character stop string found in its middle."""
    text = _run(llm, prompt, max_tokens=30, ignore_eos=True).text
    for start in range(len(text) // 3, len(text) - 2):
        stop = text[start : start + 2]
        if stop.isprintable() and stop.strip() == stop and text.find(stop) == start:
            return text, stop
    raise AssertionError(f"no stop string in {text!r}")


def test_include_stop_str_in_output_keeps_the_stop_string(llm):
    prompt = make_prompts([10], seed=74)[0]
    full, stop = _stop_string(llm, prompt)
    cut = full.find(stop)
    out = _run(llm, prompt, max_tokens=30, ignore_eos=True, stop=[stop])
    assert out.text == full[:cut] and out.stop_reason == stop
    kept = _run(
        llm, prompt, max_tokens=30, ignore_eos=True, stop=[stop], include_stop_str_in_output=True
    )
    assert kept.text == full[: cut + len(stop)] and kept.stop_reason == stop
    assert kept.token_ids == out.token_ids


def test_a_stop_token_keeps_its_text_only_with_include_stop_str(llm):
    prompt = make_prompts([14], seed=31)[0]
    base = _run(llm, prompt, max_tokens=20, ignore_eos=True).token_ids
    stop_id = base[3]
    first = base.index(stop_id)
    before = _run(llm, prompt, max_tokens=first, ignore_eos=True).text
    with_stop = _run(llm, prompt, max_tokens=first + 1, ignore_eos=True).text
    assert with_stop != before
    out = _run(llm, prompt, max_tokens=20, stop_token_ids=[stop_id])
    assert out.token_ids[-1] == stop_id and out.stop_reason == stop_id
    assert out.text == before
    kept = _run(
        llm, prompt, max_tokens=20, stop_token_ids=[stop_id], include_stop_str_in_output=True
    )
    assert kept.text == with_stop


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(logit_bias={i: 1.0 for i in range(301)}), "at most 300"),
        (dict(logit_bias={5: 100.5}), r"\[-100, 100\]"),
        (dict(logit_bias={"five": 1.0}), "logit_bias keys"),
        (dict(logit_bias={-1: 1.0}), "logit_bias keys"),
        (dict(logit_bias=[1, 2]), "logit_bias must be"),
        (dict(allowed_token_ids=[]), "allowed_token_ids"),
        (dict(allowed_token_ids=[-3]), "allowed_token_ids"),
        (dict(bad_words=["x"] * 129), "at most 128"),
        (dict(bad_words=["  "]), "bad_words"),
        (dict(bad_words=["x" * 257]), "bad_words"),
        (dict(bad_words="x"), "bad_words must be a list"),
        (dict(prompt_logprobs=21), "prompt_logprobs"),
    ],
)
def test_bounds_of_the_new_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**fields)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(logit_bias={600: 1.0}), r"logit_bias keys must be token ids in \[0, 512\)"),
        (dict(allowed_token_ids=[3, 600]), r"allowed_token_ids .* in \[0, 512\)"),
        (dict(allowed_token_ids=list(range(512)) * 2), "at most 512"),
    ],
)
def test_token_ids_are_checked_against_the_vocabulary(llm, fields, message):
    with pytest.raises(ValueError, match=message):
        llm.generate([[5, 6]], SamplingParams(**fields), use_tqdm=False)


def test_constraints_that_ban_every_token_are_refused(llm):
    tokenizer = llm.get_tokenizer()
    word = _single_token_words(tokenizer, make_prompts([40], seed=75)[0])[0]
    ids = [t for seq in _bad_word_sequences(tokenizer, word) for t in seq]
    with pytest.raises(ValueError, match="allowed_token_ids are all banned by bad_words"):
        llm.generate([[5, 6]], SamplingParams(allowed_token_ids=ids, bad_words=[word]))
    ends = SamplingParams(allowed_token_ids=[7], stop_token_ids=[7], min_tokens=1)
    with pytest.raises(ValueError, match=r"allowed_token_ids .* min_tokens \(1\) bans"):
        llm.generate([[5, 6]], ends)
    eos = llm.input_processor.eos_token_ids[0]
    with pytest.raises(ValueError, match="min_tokens"):
        llm.generate([[5, 6]], SamplingParams(allowed_token_ids=[eos], min_tokens=2))
    # One token left: accepted, and it is the one generated while min_tokens holds.
    fields = dict(allowed_token_ids=[7, 8], stop_token_ids=[7], min_tokens=3, max_tokens=3)
    assert _run(llm, [5, 6], **fields).token_ids == [8, 8, 8]
