"""RoPE scaling (YaRN, linear, dynamic NTK): cos/sin and logits equal transformers', both
config spellings parse, the context limits follow vLLM's rule, unknown types are named."""

from __future__ import annotations

import pytest
import torch

from metroline.engine import LLM, SamplingParams
from metroline.engine.checkpoint import parse_arch_config
from metroline.engine.config import EngineArgs
from metroline.engine.layers.rotary import cos_sin_cache

from ..conftest import write_tiny_checkpoint
from .conftest import make_prompts

#: name -> (architecture, config overrides): positions of the prompts below pass the YaRN
#: pre-training length (64) and stay inside dynamic NTK's max_position_embeddings (128).
SCALINGS = {
    "yarn": (
        "qwen3",
        {
            "max_position_embeddings": 256,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "linear": (
        "llama",
        {
            "max_position_embeddings": 64,
            "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        },
    ),
    "dynamic": (
        "qwen2",
        {
            "max_position_embeddings": 128,
            "rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
        },
    ),
}
_BASE = {
    "hidden_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 10,
}


def _hf_cos_sin(config_kwargs: dict, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(LlamaConfig(**_BASE, **config_kwargs))
    cos, sin = rotary(torch.zeros(1, length, 1), torch.arange(length)[None])
    return cos[0], sin[0]


@pytest.mark.parametrize(
    "raw",
    [
        {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
        # The pre-yarn spelling, DeepSeek's mscale pair, a narrower ramp without truncation.
        {
            "rope_theta": 5e4,
            "rope_scaling": {
                "type": "yarn",
                "factor": 8.0,
                "original_max_position_embeddings": 32,
                "mscale": 0.707,
                "mscale_all_dim": 1.0,
                "beta_fast": 16,
                "truncate": False,
            },
        },
        {"rope_scaling": {"rope_type": "linear", "factor": 3.0}, "rope_theta": 2e4},
        {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
    ],
    ids=["yarn", "yarn-mscale-old-spelling", "linear", "dynamic"],
)
def test_cos_sin_equal_transformers(raw):
    raw = {**raw, "max_position_embeddings": 256}
    arch = parse_arch_config({**_BASE, **raw, "architectures": ["LlamaForCausalLM"]})
    cache = cos_sin_cache(
        arch.head_dim, 256, arch.rope_theta, arch.rope_scaling, torch.device("cpu")
    )
    cos, sin = _hf_cos_sin(raw, 256)
    half = arch.head_dim // 2
    assert torch.equal(cache[:, :half], cos[:, :half])  # YaRN's attention factor included
    assert torch.equal(cache[:, half:], sin[:, :half])


@pytest.fixture(scope="module")
def scaled_checkpoints(tmp_path_factory):
    return {
        name: write_tiny_checkpoint(tmp_path_factory.mktemp(f"rope-{name}"), arch, **overrides)
        for name, (arch, overrides) in SCALINGS.items()
    }


@pytest.mark.parametrize("name", list(SCALINGS))
def test_logprobs_and_greedy_tokens_equal_transformers(name, scaled_checkpoints):
    from transformers import AutoModelForCausalLM

    path = scaled_checkpoints[name]
    hf_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    llm = LLM(model=str(path), kv_cache_memory_bytes=2**21, max_model_len=128)
    prompts = make_prompts([3, 90], seed=7)
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True)
    for prompt, output in zip(prompts, llm.generate(prompts, params, use_tqdm=False)):
        context = list(prompt)
        for token, position in zip(output.outputs[0].token_ids, output.outputs[0].logprobs):
            with torch.no_grad():
                logits = hf_model(torch.tensor([context])).logits[0, -1]
            reference = torch.log_softmax(logits, dim=-1)
            assert token == int(logits.argmax())
            for tid, entry in position.items():
                assert entry.logprob == pytest.approx(float(reference[tid]), abs=1e-4)
            context.append(token)


def test_context_limits_follow_the_scaling(scaled_checkpoints):
    def limit(name: str, **kwargs) -> int:
        args = EngineArgs(model=str(scaled_checkpoints[name]), device="cpu", **kwargs)
        return args.create_config().model.max_model_len

    assert limit("yarn") == 64 * 4  # original_max_position_embeddings x factor
    assert limit("linear") == 64 * 2  # max_position_embeddings x factor
    assert limit("dynamic") == 128  # unscaled frequencies only
    with pytest.raises(ValueError, match=r"exceeds the model's limit of 256 tokens.*YaRN"):
        limit("yarn", max_model_len=257)
    with pytest.raises(ValueError, match=r"max_position_embeddings \(128\); dynamic NTK RoPE"):
        limit("dynamic", max_model_len=129)


def test_top_level_original_length_wins_as_in_transformers():
    raw = {
        "max_position_embeddings": 256,
        "original_max_position_embeddings": 32,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                            "original_max_position_embeddings": 64},
    }  # fmt: skip
    arch = parse_arch_config({**_BASE, **raw, "architectures": ["LlamaForCausalLM"]})
    assert arch.rope_scaling["original_max_position_embeddings"] == 32
    cache = cos_sin_cache(
        arch.head_dim, 200, arch.rope_theta, arch.rope_scaling, torch.device("cpu")
    )
    cos, _ = _hf_cos_sin(raw, 200)
    assert torch.equal(cache[:, : arch.head_dim // 2], cos[:, : arch.head_dim // 2])


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"rope_scaling": {"rope_type": "longrope", "factor": 2.0}},
            "unsupported rope scaling type 'longrope'; supported: llama3, linear, dynamic, yarn",
        ),
        ({"rope_scaling": {"type": "linear"}}, "rope scaling type 'linear' needs a 'factor'"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor is not supported"),
        (
            {"rope_parameters": {"full_attention": {"rope_type": "default"}}},
            "rope_parameters per layer type are not supported",
        ),
    ],
    ids=["unknown-type", "no-factor", "partial-rotary", "per-layer"],
)
def test_unsupported_rope_settings_are_named(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_arch_config({**_BASE, **raw, "architectures": ["LlamaForCausalLM"]})
