"""The core's side of structured outputs: requests wait for their grammar while others run,
an abort or a failed compile ends one request alone, equal grammars compile once, and the
bitmask masks exactly the forbidden tokens."""

from __future__ import annotations

import threading

import pytest
import torch

from metroline.engine import LLM, SamplingParams
from metroline.engine.core import grammars as grammars_module
from metroline.engine.messages import GRAMMAR_TOO_COSTLY, NO_ALLOWED_TOKEN, EngineCoreRequest
from metroline.engine.structured_outputs import StructuredOutputsParams
from metroline.engine.worker.grammar_bitmask import apply_token_bitmask


def _request(request_id: str, params: SamplingParams, prompt=(5, 6, 7)) -> EngineCoreRequest:
    return EngineCoreRequest(
        request_id=request_id,
        prompt_token_ids=list(prompt),
        sampling_params=params,
        eos_token_ids=(0,),
        arrival_time=0.0,
    )


def _run(core, limit: int = 500) -> dict[str, list]:
    outputs: dict[str, list] = {}
    for _ in range(limit):
        if not core.has_unfinished_requests():
            break
        for output in core.step():
            outputs.setdefault(output.request_id, []).append(output)
    return outputs


@pytest.fixture
def core(tiny_checkpoint):
    llm = LLM(model=str(tiny_checkpoint("llama")))  # owns the engine: keep it alive
    yield llm.engine_core
    del llm


def test_others_run_while_a_grammar_compiles_and_an_abort_ends_it(core, monkeypatch):
    release = threading.Event()
    compile_grammar = grammars_module.GrammarManager._compile

    def slow_compile(self, params):
        release.wait(30)
        return compile_grammar(self, params)

    monkeypatch.setattr(grammars_module.GrammarManager, "_compile", slow_compile)
    regex = SamplingParams(max_tokens=8, structured_outputs={"regex": "[a-z]{3}"})
    core.add_request(_request("waits", regex))
    core.add_request(_request("aborted", regex.clone()))
    core.add_request(_request("plain", SamplingParams(max_tokens=4, temperature=0)))
    outputs = {}
    for _ in range(20):
        for output in core.step():
            outputs.setdefault(output.request_id, []).append(output)
        if "plain" in outputs and outputs["plain"][-1].finished:
            break
    assert outputs["plain"][-1].finished and set(outputs) == {"plain"}
    core.finish_requests(["aborted"])
    release.set()
    outputs = _run(core)
    assert set(outputs) == {"waits"}
    assert outputs["waits"][-1].finish_reason == "stop"
    assert not core.has_unfinished_requests()


def test_a_grammar_that_fails_to_compile_fails_its_request_alone(core, monkeypatch):
    def broken(self, params):
        raise RuntimeError("compiler out of memory")

    monkeypatch.setattr(grammars_module.GrammarManager, "_compile", broken)
    core.add_request(_request("bad", SamplingParams(structured_outputs={"regex": "x"})))
    core.add_request(_request("good", SamplingParams(max_tokens=3, temperature=0)))
    outputs = _run(core)
    (failed,) = outputs["bad"]
    assert failed.finish_reason == "error" and "compiler out of memory" in failed.error
    assert outputs["good"][-1].finish_reason == "length"


def test_equal_grammars_compile_once(core, monkeypatch):
    calls = []
    compile_grammar = grammars_module.GrammarManager._compile
    monkeypatch.setattr(
        grammars_module.GrammarManager,
        "_compile",
        lambda self, params: calls.append(params.key) or compile_grammar(self, params),
    )
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]}
    for index in range(4):
        fields = {"json": dict(schema), "disable_any_whitespace": True}
        params = SamplingParams(max_tokens=100, seed=index, structured_outputs=fields)
        core.add_request(_request(f"r{index}", params))
    outputs = _run(core)
    assert len(calls) == 1
    assert all(out[-1].finish_reason == "stop" for out in outputs.values())


def test_duplicate_request_ids_are_refused_while_compiling(core):
    params = SamplingParams(structured_outputs={"regex": "[a-z]"})
    core.add_request(_request("same", params))
    with pytest.raises(ValueError, match="already in use"):
        core.add_request(_request("same", params))
    _run(core)


def _reference_mask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    expected = logits.clone()
    for row, words in enumerate(bitmask.tolist()):
        for token in range(logits.shape[1]):
            if not (words[token // 32] >> (token % 32)) & 1:
                expected[row, token] = float("-inf")
    return expected


@pytest.mark.parametrize(("rows", "vocab"), [(3, 32), (5, 77), (300, 100), (2, 512)])
def test_the_bitmask_masks_exactly_the_forbidden_tokens(rows, vocab):
    generator = torch.Generator().manual_seed(vocab)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-(2**31), 2**31, (rows, words), dtype=torch.int64, generator=generator)
    bitmask = bitmask.to(torch.int32)
    bitmask[0] = -1  # an unconstrained row
    logits = torch.randn(rows, vocab, generator=generator)
    expected = _reference_mask(logits, bitmask)
    apply_token_bitmask(logits, bitmask)
    assert torch.equal(logits, expected)


def test_a_terminated_matcher_allows_only_its_stop_tokens(core):
    from metroline.engine.checkpoint import load_tokenizer

    manager = core.grammars
    compiled = manager.compile(StructuredOutputsParams(regex="ab")).result()
    grammar = grammars_module.RequestGrammar(compiled, (0, 40))
    assert grammar.accept(0) == NO_ALLOWED_TOKEN  # the output is not complete yet: no EOS
    for token in load_tokenizer(core.config.model.tokenizer_path).encode("ab"):
        assert grammar.accept(token) is None
    assert grammar.accept(40) is None and grammar.is_terminated
    assert grammar.accept(0) is None and grammar.accept(7) == NO_ALLOWED_TOKEN
    bitmask, failed = manager.fill_bitmask([None, grammar])
    assert not failed
    open_row, stop_row = bitmask.tolist()
    assert all(word == -1 for word in open_row)
    allowed = [t for t in range(len(stop_row) * 32) if (stop_row[t // 32] >> (t % 32)) & 1]
    assert allowed == [0, 40]


def test_a_grammar_that_runs_over_its_step_budget_fails_alone(core, monkeypatch):
    monkeypatch.setattr(grammars_module, "STEP_BUDGET_S", -1.0)
    core.add_request(_request("slow", SamplingParams(structured_outputs={"regex": "[a-z]+"})))
    core.add_request(_request("plain", SamplingParams(max_tokens=3, temperature=0)))
    outputs = _run(core)
    (failed,) = outputs["slow"]
    assert failed.finish_reason == "error" and failed.error == GRAMMAR_TOO_COSTLY
    assert outputs["plain"][-1].finish_reason == "length"
    assert core.kv_cache_manager.usage == 0


def test_a_grammar_that_never_compiles_times_out(core, monkeypatch):
    from metroline.engine.core import engine_core

    release = threading.Event()
    monkeypatch.setattr(engine_core, "COMPILE_TIMEOUT_S", 0.0)
    monkeypatch.setattr(
        grammars_module.GrammarManager, "_compile", lambda self, params: release.wait(30)
    )
    core.add_request(_request("stuck", SamplingParams(structured_outputs={"regex": "a"})))
    outputs = _run(core)
    release.set()
    assert "did not compile within" in outputs["stuck"][0].error
    assert core.stats().num_waiting == 0


def test_waiting_for_grammars_is_bounded_and_counted(core, monkeypatch):
    from metroline.engine.core import engine_core

    release = threading.Event()
    monkeypatch.setattr(engine_core, "MAX_COMPILING_REQUESTS", 2)
    monkeypatch.setattr(
        grammars_module.GrammarManager, "_compile", lambda self, params: release.wait(30)
    )
    for index in range(2):
        params = SamplingParams(structured_outputs={"regex": f"a{index}"})
        core.add_request(_request(f"r{index}", params))
    assert core.stats().num_waiting == 2
    with pytest.raises(ValueError, match="retry later"):
        core.add_request(_request("r2", SamplingParams(structured_outputs={"regex": "b"})))
    core.finish_requests(["r0", "r1"])
    release.set()
    assert not core.has_unfinished_requests()


def test_json_strings_never_hold_surrogates_or_control_characters(core):
    from metroline.benchmarks.bytelevel_tokenizer import _byte_symbols
    from metroline.engine.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(core.config.model.tokenizer_path)
    byte_token = {b: tokenizer.convert_tokens_to_ids(s) for b, s in enumerate(_byte_symbols())}
    schema = {
        "type": "object",
        "properties": {"a": {"type": "string", "maxLength": 8}, "b": {"type": "string"}},
    }
    compiled = core.grammars.compile(StructuredOutputsParams(json=schema)).result()
    for prefix in ('{"a": "', '{"b": "'):
        for forbidden in (b"\xed\xa3", b"\x07"):
            grammar = grammars_module.RequestGrammar(compiled, (0,))
            for token in tokenizer.encode(prefix):
                assert grammar.accept(token) is None
            refused = [grammar.accept(byte_token[b]) for b in forbidden]
            assert refused[-1] == NO_ALLOWED_TOKEN, (prefix, forbidden)
