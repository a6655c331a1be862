"""Structured outputs in the engine: every output of a bounded JSON schema parses and
validates, regexes and choices match, grammars survive preemption, prefix caching, n > 1,
asynchronous scheduling and TP=2. The demo model's answers (all 20 schemas, and an
always-true grammar leaving greedy output as it is) are checked through the server, in
tests/server/test_structured_acceptance.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from metroline.benchmarks.structured_schemas import SCHEMAS
from metroline.engine import LLM, SamplingParams

PROMPT = "Answer in JSON:"


def _json_params(compact: bool, seed: int = 0) -> list[SamplingParams]:
    return [
        SamplingParams(
            n=2,
            temperature=1.0,
            seed=seed + index,
            max_tokens=400,
            structured_outputs={"json": schema, "disable_any_whitespace": compact},
        )
        for index, schema in enumerate(SCHEMAS)
    ]


def _assert_valid(outputs) -> None:
    for output, schema in zip(outputs, SCHEMAS, strict=True):
        assert len(output.outputs) == 2
        for choice in output.outputs:
            assert choice.finish_reason == "stop", (choice.text, schema)
            jsonschema.validate(json.loads(choice.text), schema)


def _small_pool(path: Path, blocks: int, **kwargs) -> LLM:
    probe = LLM(model=str(path), max_model_len=512, kv_cache_memory_bytes=2**20)
    per_block = probe.engine_core.executor.worker.bytes_per_block()
    del probe
    return LLM(model=str(path), kv_cache_memory_bytes=blocks * per_block, **kwargs)


@pytest.mark.parametrize("compact", [False, True])
def test_json_schemas_under_preemption_and_prefix_caching(compact, tiny_checkpoint):
    path = tiny_checkpoint("llama")
    llm = _small_pool(
        path,
        blocks=40,
        max_model_len=512,
        enable_prefix_caching=True,
        max_num_batched_tokens=64,
    )
    outputs = llm.generate([PROMPT] * len(SCHEMAS), _json_params(compact), use_tqdm=False)
    _assert_valid(outputs)
    stats = llm.engine_core.stats()
    assert stats.num_preemptions > 0
    assert stats.prefix_cache_hits > 0
    assert llm.engine_core.kv_cache_manager.usage == 0


def test_regex_and_choice_match(tiny_checkpoint):
    llm = LLM(model=str(tiny_checkpoint("llama")))
    regexes = [r"[0-9]{3}-[a-z]{2,4}", r"(yes|no), because [a-z ]{1,20}\.", r"[A-Z][a-z]{0,5}"]
    choices = ["red", "green", "blue light", "a|b"]
    params = [
        SamplingParams(temperature=1.0, seed=i, n=2, max_tokens=60, structured_outputs={"regex": r})
        for i, r in enumerate(regexes)
    ] + [
        SamplingParams(
            temperature=1.0, seed=9, n=3, max_tokens=20, structured_outputs={"choice": choices}
        )
    ]
    outputs = llm.generate([PROMPT] * len(params), params, use_tqdm=False)
    for output, regex in zip(outputs, regexes):
        for choice in output.outputs:
            assert choice.finish_reason == "stop"
            assert re.fullmatch(regex, choice.text), (regex, choice.text)
    assert all(c.text in choices and c.finish_reason == "stop" for c in outputs[-1].outputs)


def _summary(outputs):
    return [[(c.text, c.token_ids, c.finish_reason) for c in o.outputs] for o in outputs]


def _mixed_params() -> list[SamplingParams]:
    schema = SCHEMAS[19]
    return [
        SamplingParams(temperature=0, max_tokens=400, structured_outputs={"json": schema}),
        SamplingParams(temperature=0, max_tokens=24),
        SamplingParams(
            temperature=0.9, seed=3, n=2, max_tokens=400, structured_outputs={"json": SCHEMAS[6]}
        ),
        SamplingParams(temperature=0.8, seed=5, max_tokens=24),
        SamplingParams(
            temperature=0, max_tokens=30, structured_outputs={"regex": r"[a-z]{2,8}( [a-z]+)*"}
        ),
    ]


def test_async_scheduling_gives_the_plain_order_outputs(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    prompts = [PROMPT, "def f(x):", "Give two numbers:", "Once", "words:"]
    results = []
    for asynchronous in (False, True):
        llm = LLM(model=str(path), async_scheduling=asynchronous, max_num_batched_tokens=32)
        results.append(_summary(llm.generate(prompts, _mixed_params(), use_tqdm=False)))
        llm.shutdown()  # on a GPU the next engine needs the memory
    assert results[0] == results[1]
    assert all(c[2] == "stop" for c in results[0][0] + results[0][2])


def test_tensor_parallel_grammars_match_one_rank(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    prompts = [PROMPT, "def f(x):", "Give two numbers:", "Once", "words:"]
    kwargs = {"kv_cache_memory_bytes": 2**20, "async_scheduling": True}
    tp2 = LLM(model=str(path), tensor_parallel_size=2, **kwargs)
    result = _summary(tp2.generate(prompts, _mixed_params(), use_tqdm=False))
    tp2.engine_core.shutdown()
    del tp2
    assert result == _summary(LLM(model=str(path), **kwargs).generate(prompts, _mixed_params()))


def test_a_finished_grammar_allows_only_eos(tiny_checkpoint):
    llm = LLM(model=str(tiny_checkpoint("llama")))
    params = SamplingParams(
        temperature=1.0,
        seed=1,
        max_tokens=12,
        ignore_eos=True,
        structured_outputs={"choice": ["yes", "no"]},
    )
    (output,) = llm.generate([PROMPT], params, use_tqdm=False)
    choice = output.outputs[0]
    assert choice.finish_reason == "length" and len(choice.token_ids) == 12
    assert choice.text in ("yes", "no")  # the EOS tokens after it are special: not in text
    eos = llm.get_tokenizer().eos_token_id
    text_tokens = len(llm.get_tokenizer().encode(choice.text, add_special_tokens=False))
    assert set(choice.token_ids[text_tokens:]) == {eos}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"json": {"type": "object", "properties": {"a": {"type": "strin"}}}}, "strin"),
        ({"regex": "a(b"}, "parenthesis"),
        ({"grammar": "root ::= foo"}, "foo"),
        ({"regex": "a", "choice": ["b"]}, "exactly one"),
        ({}, "exactly one"),
        ({"choice": []}, "choice"),
        ({"json": "{not json"}, "not valid JSON"),
        ({"json": {"type": "string"}, "whitespace_pattern": " "}, "whitespace_pattern"),
        ({"regex": "a" * (64 * 1024 + 1)}, "larger than"),
    ],
)
def test_invalid_structured_outputs_are_refused(fields, message, tiny_checkpoint):
    llm = LLM(model=str(tiny_checkpoint("llama")))
    with pytest.raises(ValueError, match=re.escape(message)):
        llm.generate([PROMPT], SamplingParams(structured_outputs=fields), use_tqdm=False)
    # The engine is unchanged: the next request runs.
    (output,) = llm.generate([PROMPT], SamplingParams(max_tokens=3), use_tqdm=False)
    assert len(output.outputs[0].token_ids) == 3


def test_structured_outputs_need_a_tokenizer(tmp_path, tiny_checkpoint):
    import shutil

    path = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_checkpoint("llama"), path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / name).unlink(missing_ok=True)
    llm = LLM(model=str(path))
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate([[5, 6, 7]], SamplingParams(structured_outputs={"regex": "a"}))


def test_a_grammar_at_odds_with_the_other_constraints_fails_that_request(tiny_checkpoint):
    from metroline.engine.messages import NO_ALLOWED_TOKEN

    llm = LLM(model=str(tiny_checkpoint("llama")))
    conflicting = SamplingParams(
        max_tokens=8, min_tokens=4, structured_outputs={"choice": ["a"]}, temperature=0
    )
    plain = SamplingParams(max_tokens=8, temperature=0)
    failed, fine = llm.generate([PROMPT, PROMPT], [conflicting, plain], use_tqdm=False)
    assert failed.error == NO_ALLOWED_TOKEN and failed.outputs[0].finish_reason == "error"
    assert fine.error is None and len(fine.outputs[0].token_ids) == 8


def test_schemas_nested_too_deeply_are_refused():
    from metroline.engine.structured_outputs import MAX_SCHEMA_DEPTH, StructuredOutputsParams

    schema: dict = {"type": "integer"}
    for _ in range(MAX_SCHEMA_DEPTH):
        schema = {"type": "array", "items": schema}
    with pytest.raises(ValueError, match="levels"):
        StructuredOutputsParams(json=schema)


def test_a_blocked_row_beside_rows_with_logprobs_fails_alone(tiny_checkpoint):
    from metroline.engine.messages import NO_ALLOWED_TOKEN

    llm = LLM(model=str(tiny_checkpoint("llama")))
    blocked = SamplingParams(max_tokens=8, min_tokens=4, structured_outputs={"choice": ["a"]})
    params = [blocked, blocked.clone(logprobs=1), SamplingParams(max_tokens=6, logprobs=2)]
    first, second, fine = llm.generate([PROMPT] * 3, params, use_tqdm=False)
    assert first.error == NO_ALLOWED_TOKEN and second.error == NO_ALLOWED_TOKEN
    assert fine.error is None and len(fine.outputs[0].logprobs) == 6
