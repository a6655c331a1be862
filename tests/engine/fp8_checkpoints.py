"""fp8 checkpoints written the way llm-compressor (compressed-tensors) and vLLM's fp8 format
lay them out, from a tiny model-dtype checkpoint; and the *dequantized* twin (the same fp8
values times their scales, stored in fp32 without a quantization config), which is what an
fp8 model must agree with up to the activations' rounding.

Static scales (``input_scale``, ``k_scale``/``v_scale``) are calibrated with transformers on
the checkpoint itself: forward hooks record each projection's input and the K/V outputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

COMPRESSED_TENSORS_CHANNEL = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 8,
                "type": "float",
                "strategy": "channel",
                "symmetric": True,
                "dynamic": False,
            },
            "input_activations": {
                "num_bits": 8,
                "type": "float",
                "strategy": "token",
                "symmetric": True,
                "dynamic": True,
            },
        }
    },
    "ignore": ["lm_head"],
}
FP8_STATIC = {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}


def _projection(name: str) -> str | None:
    parts = name.split(".")
    return (
        parts[-2]
        if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in PROJECTIONS
        else None
    )


def calibrate(source: Path, prompts: list[list[int]]) -> dict[str, float]:
    """Largest |value| seen per module input (``<module>.input``) and per K/V output
    (``<layer>.self_attn.k``/``.v``, before RoPE), over ``prompts``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    amax: dict[str, float] = {}

    def record(key: str, tensor: torch.Tensor) -> None:
        amax[key] = max(amax.get(key, 0.0), float(tensor.abs().max()))

    def hook(name: str):
        def observe(module, args, out) -> None:
            record(f"{name}.input", args[0])
            if name.endswith(("k_proj", "v_proj")):
                record(name[: -len("_proj")], out)

        return observe

    hooks = [
        module.register_forward_hook(hook(name))
        for name, module in model.named_modules()
        if name.split(".")[-1] in PROJECTIONS
    ]
    with torch.no_grad():
        for prompt in prompts:
            model(torch.tensor([prompt]))
    for hook in hooks:
        hook.remove()
    return amax


def write_fp8_checkpoint(
    source: Path,
    target: Path,
    dequantized: Path | None,
    strategy: str,
    calibration: dict[str, float] | None = None,
    kv_scales: str | None = None,
    num_kv_heads: int = 2,
) -> Path:
    """Quantize ``source``'s projections into ``target`` (``strategy``: "channel" writes
    compressed-tensors with per-channel scales and dynamic activations; "tensor" writes
    quant_method fp8 with per-tensor scales and static ``input_scale`` from ``calibration``).
    ``kv_scales`` "tensor" or "head" adds ``self_attn.k_scale``/``v_scale`` (from calibration,
    a margin of 2 for RoPE). ``dequantized``, if given, receives the fp32 twin."""
    tensors = load_file(str(source / "model.safetensors"))
    quantized: dict[str, torch.Tensor] = {}
    plain: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if _projection(name) is None:
            quantized[name] = plain[name] = tensor
            continue
        module = name[: -len(".weight")]
        if strategy == "channel":
            scale = (tensor.abs().amax(dim=1).float() / FP8_MAX).clamp(min=1e-12)
        else:
            scale = (tensor.abs().max().float() / FP8_MAX).reshape(())
        weight = (tensor.float() / (scale[:, None] if scale.dim() else scale)).clamp(-448, 448)
        weight = weight.to(FP8)
        quantized[name] = weight
        quantized[f"{module}.weight_scale"] = scale[:, None] if scale.dim() else scale
        plain[name] = weight.float() * (scale[:, None] if scale.dim() else scale)
        if strategy == "tensor":
            quantized[f"{module}.input_scale"] = torch.tensor(
                calibration[f"{module}.input"] / FP8_MAX
            )
    if kv_scales is not None:
        for key, value in (calibration or {}).items():
            if key.endswith(("self_attn.k", "self_attn.v")):
                scale = torch.tensor(2 * value / FP8_MAX)
                if kv_scales == "head":
                    scale = scale * torch.linspace(0.8, 1.2, num_kv_heads)
                quantized[f"{key}_scale"] = scale
    for directory, weights, quant in ((target, quantized, True), (dequantized, plain, False)):
        if directory is None:
            continue
        shutil.copytree(source, directory, dirs_exist_ok=True)
        save_file(weights, str(directory / "model.safetensors"))
        config = json.loads((source / "config.json").read_text())
        if quant:
            config["quantization_config"] = (
                COMPRESSED_TENSORS_CHANNEL if strategy == "channel" else FP8_STATIC
            )
        (directory / "config.json").write_text(json.dumps(config))
    return target
