"""fp8 models on the CPU reference paths (they emulate fp8 with the same scales): checkpoints
in both common layouts load and agree with their dequantized twin within the stated bound,
online quantization equals the per-channel checkpoint exactly, TP=2 stays within the bound of
TP=1, and an fp8 KV cache keeps prefix caching and preemption exact.

The bound (docs/engine.md, "fp8"): prompt log-probabilities within ``LOGPROB_BOUND`` of the
dequantized model's. What differs is the activations' rounding to e4m3 (relative error up to
2**-4 per element) and, with an fp8 KV cache, the keys' and values' too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metroline.engine import LLM, SamplingParams

from .conftest import make_prompts
from .fp8_checkpoints import calibrate, write_fp8_checkpoint

#: Largest |difference| of a prompt token's log-probability, fp8 vs the dequantized twin, on
#: checkpoints whose weights have the spread of trained ones (std 0.05, not the suite's 0.25,
#: whose near-one-hot outputs magnify every rounding).
LOGPROB_BOUND = 0.1
PROMPTS = make_prompts((5, 17, 40), seed=3)
SMALL = dict(kv_cache_memory_bytes=2**21, max_model_len=128, max_num_batched_tokens=32)


def _prompt_logprobs(llm: LLM) -> torch.Tensor:
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    values = []
    for output in llm.generate(PROMPTS, params, use_tqdm=False):
        for token, entry in zip(output.prompt_token_ids[1:], output.prompt_logprobs[1:]):
            values.append(entry[token].logprob)
    return torch.tensor(values)


def _greedy(llm: LLM, prompts, max_tokens: int = 12) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, tmp_path_factory):
    source = tiny_checkpoint("llama", initializer_range=0.05)
    root = tmp_path_factory.mktemp("fp8")
    calibration = calibrate(source, PROMPTS)
    made = {"source": source}
    for strategy in ("channel", "tensor"):
        made[strategy] = write_fp8_checkpoint(
            source,
            root / strategy,
            root / f"{strategy}-dequantized",
            strategy,
            calibration,
            kv_scales="head" if strategy == "tensor" else None,
        )
        made[f"{strategy}-dequantized"] = root / f"{strategy}-dequantized"
    return made


def _run(path, **kwargs):
    llm = LLM(model=str(path), **SMALL, **kwargs)
    try:
        return _prompt_logprobs(llm), _greedy(llm, PROMPTS)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_checkpoint_within_bound_of_dequantized_twin(strategy, checkpoints):
    """channel: compressed-tensors, per-channel weights, per-token activations; tensor: vLLM's
    fp8 layout, per-tensor weights and static input scales (packed shards keep their own)."""
    fp8, _ = _run(checkpoints[strategy])
    twin, _ = _run(checkpoints[f"{strategy}-dequantized"])
    error = (fp8 - twin).abs().max().item()
    assert 0 < error <= LOGPROB_BOUND  # > 0: the activations really were rounded


def test_online_quantization_equals_the_channel_checkpoint(checkpoints):
    online = _run(checkpoints["source"], quantization="fp8")
    stored = _run(checkpoints["channel"])
    assert torch.equal(online[0], stored[0]) and online[1] == stored[1]


def test_tp2_within_bound_of_tp1(checkpoints):
    """Weights and scales are the same at any TP degree (online scales reduce their amax over
    the ranks); the row-parallel layers' per-token input scales are computed per rank, over
    that rank's slice of the features, so TP=2 differs from TP=1 within the bound."""
    tp1, _ = _run(checkpoints["source"], quantization="fp8")
    tp2, _ = _run(checkpoints["source"], quantization="fp8", tensor_parallel_size=2)
    assert (tp1 - tp2).abs().max().item() <= LOGPROB_BOUND


def test_fp8_kv_cache_within_bound_and_twice_the_tokens(checkpoints):
    path = checkpoints["tensor"]  # per-head k_scale / v_scale from the checkpoint
    fp8_kv, _ = _run(path, kv_cache_dtype="fp8")
    model_dtype_kv, _ = _run(path)
    assert 0 < (fp8_kv - model_dtype_kv).abs().max().item() <= LOGPROB_BOUND
    llm = LLM(model=str(path), kv_cache_dtype="fp8", dtype="bfloat16", **SMALL)
    try:
        fp8_blocks = llm.engine_core.num_blocks
        worker = llm.engine_core.executor.worker
        assert worker.key_caches[0].dtype == torch.float8_e4m3fn
        scales = worker.model.attention_layers()[0].k_scale
        assert scales.shape == (2,) and scales[0] != scales[1]  # per head, from the checkpoint
    finally:
        llm.shutdown()
    llm = LLM(model=str(path), dtype="bfloat16", **SMALL)
    assert fp8_blocks == 2 * llm.engine_core.num_blocks
    llm.shutdown()


def test_fp8_kv_cache_exact_under_prefix_caching_and_preemption(checkpoints):
    """The pool holds the same e4m3 bytes whether a block was computed, reused from the prefix
    cache or recomputed after preemption: outputs equal a roomy run without caching."""
    path = checkpoints["source"]
    prompts = [[*p, 7, 8, 9] for p in PROMPTS] + PROMPTS
    kwargs = dict(quantization="fp8", kv_cache_dtype="fp8", max_model_len=128)
    roomy = LLM(model=str(path), kv_cache_memory_bytes=2**21, enable_prefix_caching=False, **kwargs)
    reference = _greedy(roomy, prompts, max_tokens=24)
    per_block = roomy.engine_core.executor.worker.bytes_per_block()
    roomy.shutdown()
    tight = LLM(
        model=str(path),
        kv_cache_memory_bytes=12 * per_block,
        enable_prefix_caching=True,
        max_num_batched_tokens=16,
        **kwargs,
    )
    try:
        assert _greedy(tight, prompts, max_tokens=24) == reference
        stats = tight.engine_core.stats()
        assert stats.prefix_cache_hits > 0 and stats.num_preemptions > 0
    finally:
        tight.shutdown()


def test_malformed_fp8_checkpoints_are_refused(checkpoints, tmp_path):
    """Real-valued weights under an fp8 config (a checkpoint saved uncompressed) and per-head
    KV scales of the wrong length fail loading, naming the tensor; never cast or sliced."""
    import shutil

    from safetensors.torch import load_file, save_file

    def variant(name: str, change) -> Path:
        target = tmp_path / name
        shutil.copytree(checkpoints["tensor"], target)
        tensors = load_file(str(target / "model.safetensors"))
        change(tensors)
        save_file(tensors, str(target / "model.safetensors"))
        return target

    weight = "model.layers.0.mlp.down_proj.weight"
    dense = variant("dense", lambda t: t.update({weight: t[weight].float().to(torch.bfloat16)}))
    with pytest.raises(ValueError, match=r"down_proj.*must be float8_e4m3fn"):
        LLM(model=str(dense), **SMALL)
    scale = "model.layers.1.self_attn.k_scale"
    wrong = variant("kv", lambda t: t.update({scale: torch.ones(3)}))
    with pytest.raises(ValueError, match="one per KV head \\(2\\)"):
        LLM(model=str(wrong), kv_cache_dtype="fp8", **SMALL)
