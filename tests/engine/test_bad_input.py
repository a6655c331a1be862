"""Bad input is a ValueError naming what is wrong and what is allowed; the engine keeps
serving everything else."""

from __future__ import annotations

import pytest

from metroline.engine import LLM, SamplingParams
from metroline.engine.checkpoint import parse_arch_config
from metroline.engine.config import ParallelConfig

from .conftest import make_prompts


@pytest.fixture(scope="module")
def llm(tiny_checkpoint) -> LLM:
    return LLM(model=str(tiny_checkpoint("llama")), max_model_len=64, kv_cache_memory_bytes=2**20)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_tokens=0), r"max_tokens must be an integer in \[1, 2147483647\]"),
        (dict(max_tokens=2**31), r"max_tokens must be an integer in \[1, 2147483647\]"),
        (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
        (dict(temperature=float("inf")), "temperature must be a finite number"),
        (dict(temperature=10**400), "an integer of 1329 bits"),
        (dict(top_p=float("nan")), r"top_p must be in \(0, 1\]"),
        (
            dict(top_k=2**63),
            r"top_k must be -1 or 0 \(disabled\) or an integer in \[1, 2147483647\]",
        ),
        (dict(min_tokens=2**31, max_tokens=None), r"min_tokens must be an integer in \[0,"),
        (dict(n=129), r"n must be an integer in \[1, 128\]"),
        (dict(stop=["x"] * 33), "at most 32 strings"),
        (dict(stop="x" * 257), "each of 1 to 256 characters"),
        (dict(stop=5), "stop must be a list"),
        (dict(stop_token_ids=list(range(257))), "at most 256 token ids"),
        (dict(stop_token_ids=[2**40]), r"token ids in \[0, 2147483647\]"),
        (dict(frequency_penalty=float("-inf")), r"frequency_penalty must be in \[-2, 2\]"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-3), "top_k must be"),
        (dict(min_p=2.0), r"min_p must be in \[0, 1\]"),
        (dict(n=0), r"n must be an integer in \[1, 128\]"),
        (dict(presence_penalty=3.0), r"presence_penalty must be in \[-2, 2\]"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty must be a finite number"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens"),
        (dict(stop=[""]), "stop must be"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
        (dict(logprobs=21), "logprobs must be"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(seed=2**64), "seed must be an integer in"),
        (dict(seed=2**64 - 2, n=3), "seed must be an integer in"),
        (dict(seed=-(2**63) - 1), "seed must be an integer in"),
    ],
)
def test_sampling_params_reject_out_of_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_bad_prompts_are_rejected_and_the_engine_keeps_serving(llm):
    good = make_prompts([5, 12], seed=2)
    params = SamplingParams(temperature=0, max_tokens=8)
    expected = [o.outputs[0].token_ids for o in llm.generate(good, params, use_tqdm=False)]
    with pytest.raises(ValueError, match="the prompt has 64 tokens, but max_model_len is 64"):
        llm.generate([*good, list(range(2, 66))], params, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([good[0], []], params, use_tqdm=False)
    with pytest.raises(ValueError, match=r"token ids must be integers in \[0, 512\)"):
        llm.generate([[5, 9999]], params, use_tqdm=False)
    with pytest.raises(
        ValueError, match=r"token ids must be integers in \[0, 512\); got \[an integer"
    ):
        llm.generate([[5, 10**5000]], params, use_tqdm=False)
    with pytest.raises(ValueError, match=r"stop_token_ids must be token ids in \[0, 512\)"):
        llm.generate([good[0]], params.clone(stop_token_ids=[600]), use_tqdm=False)
    with pytest.raises(ValueError, match="2 sampling params for 1 prompts"):
        llm.generate([good[0]], [params, params], use_tqdm=False)
    with pytest.raises(ValueError, match="a prompt must be a string or a list of token ids"):
        llm.generate([3.5], params, use_tqdm=False)
    assert not llm.engine_core.has_unfinished_requests()
    again = [o.outputs[0].token_ids for o in llm.generate(good, params, use_tqdm=False)]
    assert again == expected


def test_top_k_above_the_vocabulary_keeps_every_token(llm):
    """A top_k of the vocabulary size or more is no filter: the same draws as top_k=-1."""
    prompt = make_prompts([9], seed=3)
    outputs = [
        llm.generate(prompt, SamplingParams(top_k=k, seed=7, max_tokens=8), use_tqdm=False)
        for k in (-1, 512, 2**31 - 1)
    ]
    tokens = [o[0].outputs[0].token_ids for o in outputs]
    assert tokens[0] == tokens[1] == tokens[2]


def test_generation_stops_at_max_model_len(llm):
    prompt = make_prompts([60], seed=4)[0]
    out = llm.generate([prompt], SamplingParams(max_tokens=50, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    assert out[0].outputs[0].finish_reason == "length"


def test_tensor_parallel_must_divide_heads(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 does not divide"):
        LLM(model=str(tiny_checkpoint("llama")), tensor_parallel_size=3)
    arch = parse_arch_config(
        {
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 4096,
            "num_hidden_layers": 1,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "intermediate_size": 14336,
            "vocab_size": 1000,
        }
    )
    for ok in (1, 2, 4, 8, 16, 32):
        ParallelConfig(ok).check_model(arch)
    for bad in (3, 5, 6, 12, 64):
        with pytest.raises(ValueError, match="does not divide"):
            ParallelConfig(bad).check_model(arch)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(block_size=7), "block_size must be one of"),
        (dict(gpu_memory_utilization=1.5), r"gpu_memory_utilization must be in \(0, 1\]"),
        (dict(max_num_seqs=0), "max_num_seqs must be a positive integer"),
        (dict(max_model_len=100_000), "exceeds the model's max_position_embeddings"),
        (dict(dtype="int8"), "dtype must be"),
        (dict(load_format="gguf"), "load_format must be one of"),
        (dict(device="tpu"), "device must be"),
        (dict(kv_cache_memory_bytes=1000), "less than one sequence of max_model_len"),
    ],
)
def test_engine_arguments_are_checked(tiny_checkpoint, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLM(model=str(tiny_checkpoint("llama")), **kwargs)


def test_missing_model_directory(tmp_path):
    with pytest.raises(ValueError, match="not one"):
        LLM(model=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"no config\.json"):
        LLM(model=str(tmp_path))


def test_shutdown_frees_the_model_while_the_engine_object_lives(tiny_checkpoint):
    import weakref

    llm = LLM(model=str(tiny_checkpoint("llama")), kv_cache_memory_bytes=2**20)
    worker = llm.engine_core.executor.worker
    model, caches = weakref.ref(worker.model), [weakref.ref(t) for t in worker.key_caches]
    llm.shutdown()
    assert model() is None and all(ref() is None for ref in caches)
    llm.shutdown()  # idempotent
