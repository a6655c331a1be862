"""Checkpoint loading: sharded safetensors, dummy weights, errors, config parsing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from metroline.engine import LLM, SamplingParams
from metroline.engine.checkpoint import parse_arch_config
from metroline.engine.config import EngineArgs
from metroline.engine.layers.rotary import inverse_frequencies

from .conftest import make_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=12)


def _tokens(llm, prompts):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def test_sharded_checkpoint_with_index_loads_the_same(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("qwen2")
    target = tmp_path / "sharded"
    shutil.copytree(source, target)
    (target / "model.safetensors").unlink()
    tensors = load_file(str(source / "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for part, chunk in enumerate((names[::3], names[1::3], names[2::3])):
        filename = f"model-{part + 1:05d}-of-00003.safetensors"
        save_file({n: tensors[n].contiguous() for n in chunk}, str(target / filename))
        weight_map.update(dict.fromkeys(chunk, filename))
    (target / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    prompts = make_prompts([4, 20], seed=70)
    kwargs = dict(kv_cache_memory_bytes=2**20)
    assert _tokens(LLM(model=str(target), **kwargs), prompts) == _tokens(
        LLM(model=str(source), **kwargs), prompts
    )


def test_missing_and_unknown_weights_are_named(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("llama")
    tensors = load_file(str(source / "model.safetensors"))
    broken = tmp_path / "missing"
    shutil.copytree(source, broken)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lacks weights for: model.layers.1.self_attn.qkv_proj"):
        LLM(model=str(broken), kv_cache_memory_bytes=2**20)
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(32, 64)
    tensors["model.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'model\.extra\.weight' matches no model parameter"):
        LLM(model=str(broken), kv_cache_memory_bytes=2**20)
    tensors.pop("model.extra.weight")
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(31, 64)
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=r"has shape \(31, 64\)"):
        LLM(model=str(broken), kv_cache_memory_bytes=2**20)


def test_dummy_weights_need_only_config(tiny_checkpoint, tmp_path):
    only_config = tmp_path / "dummy"
    only_config.mkdir()
    shutil.copy(tiny_checkpoint("qwen3") / "config.json", only_config / "config.json")
    with pytest.raises(ValueError, match="load_format='dummy'"):
        LLM(model=str(only_config))
    first = LLM(model=str(only_config), load_format="dummy", kv_cache_memory_bytes=2**20)
    second = LLM(model=str(only_config), load_format="dummy", kv_cache_memory_bytes=2**20)
    prompts = make_prompts([7, 18], seed=3)
    assert _tokens(first, prompts) == _tokens(second, prompts)  # deterministic per seed
    with pytest.raises(ValueError, match="no tokenizer files"):
        first.generate(["text"], GREEDY, use_tqdm=False)
    out = first.generate(prompts, GREEDY, use_tqdm=False)
    assert out[0].outputs[0].text == ""


def test_unknown_architecture_names_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="supported: LlamaForCausalLM, MistralForCausalLM"):
        EngineArgs(model=str(tmp_path)).create_config()


def test_sliding_window_caps_max_model_len(tiny_checkpoint, caplog):
    path = tiny_checkpoint("mistral", sliding_window=48)
    with caplog.at_level("WARNING"):
        config = EngineArgs(model=str(path), device="cpu").create_config().model
    assert config.max_model_len == 48
    assert "max_model_len capped from 512 to 48" in caplog.text
    qwen = parse_arch_config(
        {
            "architectures": ["Qwen2ForCausalLM"],
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "vocab_size": 10,
            "sliding_window": 32,
            "use_sliding_window": False,
        }
    )
    assert qwen.sliding_window is None


def test_rope_config_spellings():
    base = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "vocab_size": 10,
    }
    scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    old = parse_arch_config(
        {**base, "rope_theta": 5e5, "rope_scaling": {**scaling, "rope_type": "llama3"}}
    )
    new = parse_arch_config(
        {**base, "rope_parameters": {**scaling, "rope_type": "llama3", "rope_theta": 5e5}}
    )
    assert old.rope_theta == new.rope_theta == 5e5
    assert old.rope_scaling["factor"] == new.rope_scaling["factor"] == 8.0
    with pytest.raises(ValueError, match="unsupported rope scaling type 'longrope'"):
        parse_arch_config({**base, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}})


def test_llama3_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=params)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    got = inverse_frequencies(128, 500000.0, params, torch.device("cpu"))
    assert torch.equal(got, expected)
