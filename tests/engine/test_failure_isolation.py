"""A request that raises inside the engine fails alone: injected faults (engine/faults.py)
in one request's inputs, sampling, token update or output processing end that request with
an error, and every other request of the same steps gets exactly the tokens it gets without
the fault (greedy and seeded sampling alike). Device and process faults still stop the
engine."""

from __future__ import annotations

import pytest
import torch

from metroline.engine import LLM, SamplingParams, faults

from .conftest import make_prompts

PROMPTS = make_prompts((5, 17, 31, 48))


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    engine = LLM(model=str(tiny_checkpoint("llama")), max_model_len=128)
    yield engine
    engine.shutdown()


def params_for(index: int) -> SamplingParams:
    """Greedy, seeded sampling with penalties and log-probs, in turn: every sampler path."""
    if index % 2 == 0:
        return SamplingParams(temperature=0, max_tokens=12)
    return SamplingParams(
        temperature=0.8, top_k=20, seed=100 + index, max_tokens=12, presence_penalty=0.5,
        logprobs=2,
    )  # fmt: skip


def next_request_id(llm) -> int:
    """The id the offline LLM gives the next request (it numbers them "0", "1", ...)."""
    return next(llm._request_counter) + 1


def run(llm):
    params = [params_for(i) for i in range(len(PROMPTS))]
    return llm.generate(PROMPTS, params, use_tqdm=False)


def inject(monkeypatch, stage: str, request_id: str) -> None:
    monkeypatch.setattr(faults, "_FAULTS", {stage: request_id})
    monkeypatch.setattr(faults, "ACTIVE", True)


@pytest.mark.parametrize("stage", ["inputs", "sampling", "update", "detokenize"])
def test_fault_in_one_request_fails_it_alone(llm, monkeypatch, stage):
    expected = run(llm)
    inject(monkeypatch, stage, str(next_request_id(llm) + 2))  # the third request only
    outputs = run(llm)
    for index, (output, reference) in enumerate(zip(outputs, expected)):
        if index == 2:
            assert output.error is not None and "injected fault" in output.error
            assert output.outputs[0].finish_reason == "error"
            continue
        assert output.error is None
        assert output.outputs[0].token_ids == reference.outputs[0].token_ids, index
        assert output.outputs[0].finish_reason == reference.outputs[0].finish_reason
    # The engine goes on serving, with nothing left behind.
    monkeypatch.setattr(faults, "ACTIVE", False)
    again = run(llm)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in expected]
    assert not llm.engine_core.has_unfinished_requests()
    assert llm.engine_core.kv_cache_manager.usage == 0


def test_failed_sequence_aborts_its_siblings(llm, monkeypatch):
    """n > 1: one failed sequence fails the request; its siblings are aborted in the core."""
    inject(monkeypatch, "sampling", f"1_{next_request_id(llm)}")  # its sequence 1
    (output,) = llm.generate(
        [PROMPTS[1]], SamplingParams(n=3, temperature=0.7, seed=5, max_tokens=40), use_tqdm=False
    )
    assert output.error is not None and "injected fault" in output.error
    reasons = sorted(c.finish_reason for c in output.outputs)
    assert reasons == ["abort", "abort", "error"]
    assert not llm.engine_core.has_unfinished_requests()
    assert llm.engine_core.kv_cache_manager.usage == 0


def test_device_faults_still_stop_the_engine():
    assert faults.poisons_engine(torch.OutOfMemoryError("CUDA out of memory"))
    assert faults.poisons_engine(RuntimeError("CUDA error: an illegal memory access"))
    assert faults.poisons_engine(MemoryError())
    assert faults.poisons_engine(KeyboardInterrupt())
    assert not faults.poisons_engine(ValueError("bad top_k"))
    assert not faults.poisons_engine(faults.InjectedFault("x"))


def test_a_step_that_fails_for_no_single_request_is_fatal(llm, monkeypatch):
    """If the whole batch fails but no request alone does, nothing explains the fault."""
    import metroline.engine.worker.model_runner as model_runner

    real = model_runner.build_step_inputs
    calls = {"n": 0}

    def fail_for_batches(scheduled, *args, **kwargs):
        calls["n"] += 1
        if len(scheduled.num_scheduled_tokens) > 1:
            raise ValueError("only batches fail")
        return real(scheduled, *args, **kwargs)

    monkeypatch.setattr(model_runner, "build_step_inputs", fail_for_batches)
    with pytest.raises(ValueError, match="only batches fail"):
        llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    monkeypatch.setattr(model_runner, "build_step_inputs", real)
    assert not llm.engine_core.has_unfinished_requests()


def test_sampling_fault_after_the_draws_keeps_seeded_tokens(llm, monkeypatch):
    """A fault after the batch drew its random numbers (here, in picking log-probs): the
    rows are sampled again one by one from restored generators, so seeded requests still
    get the tokens they get without the fault."""
    import metroline.engine.worker.model_runner as model_runner

    expected = run(llm)
    target = str(next_request_id(llm) + 3)  # a seeded request with log-probs
    real = model_runner.wanted_logprobs

    def fail_for_target(states, *args):
        if any(state.request_id == target for state in states):
            raise RuntimeError("log-probs failed")
        return real(states, *args)

    monkeypatch.setattr(model_runner, "wanted_logprobs", fail_for_target)
    outputs = run(llm)
    assert outputs[3].error is not None and "log-probs failed" in outputs[3].error
    for index in (0, 1, 2):
        assert outputs[index].error is None
        assert outputs[index].outputs[0].token_ids == expected[index].outputs[0].token_ids
        got, want = outputs[index].outputs[0].logprobs, expected[index].outputs[0].logprobs
        if want is not None:  # computed on one row instead of the batch: equal up to rounding
            assert [sorted(p) for p in got] == [sorted(p) for p in want]
            for position, reference in zip(got, want):
                for token, logprob in reference.items():
                    assert position[token].logprob == pytest.approx(logprob.logprob, abs=1e-5)


@pytest.mark.parametrize("stage", ["inputs", "sampling"])
def test_fault_fails_one_request_alone_with_tensor_parallelism(tiny_checkpoint, monkeypatch, stage):
    """TP=2 with asynchronous scheduling: every rank leaves the same request out of a step
    (inputs), or the driver alone fails it and broadcasts a placeholder (sampling); the other
    requests get exactly the tokens of the fault-free run."""
    path = str(tiny_checkpoint("llama"))
    kwargs = dict(max_model_len=128, kv_cache_memory_bytes=2**21, async_scheduling=True)
    greedy = SamplingParams(temperature=0, max_tokens=12)
    reference = LLM(model=path, **kwargs)
    expected = [o.outputs[0].token_ids for o in reference.generate(PROMPTS, greedy)]
    reference.shutdown()
    monkeypatch.setenv(faults.ENV_VAR, f"{stage}:2")  # the worker processes read it at start
    inject(monkeypatch, stage, "2")  # requests "0".."3" of a fresh engine: the third
    llm = LLM(model=path, tensor_parallel_size=2, **kwargs)
    try:
        outputs = llm.generate(PROMPTS, greedy, use_tqdm=False)
        assert not llm.engine_core.has_unfinished_requests()
    finally:
        llm.shutdown()
    assert outputs[2].error is not None and f"injected fault at {stage}" in outputs[2].error
    for index in (0, 1, 3):
        assert outputs[index].error is None
        assert outputs[index].outputs[0].token_ids == expected[index]


def test_a_request_failing_before_its_kv_is_written_leaves_no_cache_behind(
    llm, monkeypatch, tiny_checkpoint, hf_greedy
):
    """Inputs failure: the step ran without the request, so its freshly cached blocks hold
    nothing. They leave the prefix cache, a request that already hit them in the same step
    fails too (it read them), and a later identical prompt gets the right tokens (those of
    transformers: the prompt is new to this engine's cache)."""
    prompt = make_prompts((40,), seed=9)[0]  # two full blocks
    greedy = SamplingParams(temperature=0, max_tokens=8)
    (expected,) = hf_greedy(tiny_checkpoint("llama"), [prompt], 8)
    inject(monkeypatch, "inputs", str(next_request_id(llm)))  # the first of two copies
    first, second = llm.generate([prompt, prompt], greedy, use_tqdm=False)
    assert first.error is not None and "injected fault" in first.error
    assert second.error is not None and "shared KV-cache blocks" in second.error
    monkeypatch.setattr(faults, "ACTIVE", False)
    (again,) = llm.generate([prompt], greedy, use_tqdm=False)
    assert again.error is None and again.outputs[0].token_ids == expected
    assert llm.engine_core.kv_cache_manager.usage == 0
