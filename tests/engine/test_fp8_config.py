"""fp8 settings resolve before any process starts: the checkpoint layouts that load, the ones
refused with their reason, and the flags."""

from __future__ import annotations

import copy

import pytest

from metroline.engine.quantization import (
    Fp8Config,
    resolve_kv_cache_dtype,
    resolve_quantization,
)

from .fp8_checkpoints import COMPRESSED_TENSORS_CHANNEL, FP8_STATIC


def test_checkpoint_layouts_that_load():
    assert resolve_quantization(None, None, "auto") is None
    assert resolve_quantization("fp8", None, "auto") == Fp8Config(from_checkpoint=False)
    channel = resolve_quantization(None, COMPRESSED_TENSORS_CHANNEL, "auto")
    assert channel == Fp8Config(True, "dynamic", ("lm_head",))
    static = resolve_quantization("fp8", FP8_STATIC, "safetensors")
    assert static == Fp8Config(True, "static", ("lm_head",))
    # Dummy weights are random model-dtype tensors: the fp8 config means online quantization.
    assert resolve_quantization(None, FP8_STATIC, "dummy") == Fp8Config(
        False, "dynamic", ("lm_head",)
    )


def _group(**changes) -> dict:
    config = copy.deepcopy(COMPRESSED_TENSORS_CHANNEL)
    group = config["config_groups"]["group_0"]
    for key, value in changes.items():
        if value is None:
            group.pop(key)
        else:
            group[key] = {**group[key], **value} if isinstance(value, dict) else value
    return config


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"quant_method": "awq", "bits": 4}, "quantization method 'awq' is not supported"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "block-wise"),
        ({"quant_method": "fp8", "activation_scheme": "per-head"}, "activation_scheme"),
        (_group(input_activations=None), "quantizes weights only"),
        (_group(weights={"strategy": "group", "group_size": 128}), "'channel' or 'tensor'"),
        (_group(weights={"num_bits": 4, "type": "int"}), "8-bit float"),
        (_group(targets=["Linear", "Embedding"]), "supported: \\['Linear'\\]"),
        (_group(input_activations={"dynamic": False, "strategy": "token"}), "per tensor"),
        ({"quant_method": "compressed-tensors", "format": "float-quantized"}, "config_groups"),
        ({**COMPRESSED_TENSORS_CHANNEL, "format": "dense"}, "format 'dense' is not supported"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_layouts_refused_with_the_reason(config, message):
    with pytest.raises(ValueError, match=message):
        resolve_quantization(None, config, "auto")


def test_flag_values_and_ignored_modules():
    with pytest.raises(ValueError, match="quantization must be one of"):
        resolve_quantization("int8", None, "auto")
    assert resolve_kv_cache_dtype("fp8_e4m3") == resolve_kv_cache_dtype("fp8") == "fp8"
    with pytest.raises(ValueError, match="fp8_e5m2 is not supported"):
        resolve_kv_cache_dtype("fp8_e5m2")
    fp8 = Fp8Config(True, "dynamic", ("re:.*layers\\.1\\.mlp\\..*", "model.layers.0.mlp.down_proj"))
    assert fp8.quantizes(["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"])
    assert not fp8.quantizes(["model.layers.0.mlp.down_proj"])
    assert not fp8.quantizes(["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"])
    partial = Fp8Config(True, "dynamic", ("model.layers.0.mlp.gate_proj",))
    with pytest.raises(ValueError, match="share one precision"):
        partial.quantizes(["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"])


def test_cli_flags_and_pool_bytes(tiny_checkpoint):
    from metroline.engine.config import EngineArgs

    path = str(tiny_checkpoint("llama"))
    auto = EngineArgs(model=path, device="cpu", dtype="bfloat16").create_config()
    fp8 = EngineArgs(
        model=path, device="cpu", dtype="bfloat16", kv_cache_dtype="fp8", quantization="fp8"
    ).create_config()
    assert fp8.kv_bytes_per_block * 2 == auto.kv_bytes_per_block
    assert fp8.model.quantization == Fp8Config(from_checkpoint=False)
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        EngineArgs(model=path, device="cpu", kv_cache_dtype="int8").create_config()
