"""Build a model and fill its weights from a Hugging Face checkpoint (or synthetic ones).

Loading walks checkpoint tensors by name and hands each to its parameter's
``weight_loader``; packed parameters (qkv, gate_up) receive one shard per checkpoint tensor.
Every parameter shard must be filled exactly once, otherwise loading fails naming what is
missing. ``load_format="dummy"`` feeds the same path with random tensors generated per
checkpoint name from the seed, so every tensor-parallel layout sees the same weights.
Afterwards each layer's ``finish_loading`` runs (fp8 layers quantize or check their scales).

KV-cache scales (``self_attn.k_scale``/``v_scale``, or the older ``k_proj``/``v_proj``
``output_scale``) are optional: an fp8 pool without them uses 1.0; a pool in the model dtype
needs none, and they are skipped with a log line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ..checkpoint import ModelArchConfig, check_safetensors
from ..config import ModelConfig
from .registry import model_class

logger = logging.getLogger(__name__)

#: Checkpoint entries that are not weights (buffers some exporters write).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
#: Standard deviation of the synthetic (normally distributed) weights.
DUMMY_STD = 0.02
#: Checkpoint spellings of KV-cache scales -> the attention layer's parameters.
_KV_SCALE_NAMES = {
    ".self_attn.k_scale": (".self_attn.attn.k_scale",),
    ".self_attn.v_scale": (".self_attn.attn.v_scale",),
    ".self_attn.k_proj.output_scale": (".self_attn.attn.k_scale",),
    ".self_attn.v_proj.output_scale": (".self_attn.attn.v_scale",),
    ".self_attn.kv_scale": (".self_attn.attn.k_scale", ".self_attn.attn.v_scale"),
}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(model_config: ModelConfig, device: torch.device, kv_fp8: bool = False) -> nn.Module:
    """Instantiate the architecture on ``device`` in the configured dtype, weights unset;
    ``kv_fp8``: the attention layers get KV-cache scales."""
    cls = model_class(model_config.arch.architecture)
    with torch.device(device), _default_dtype(model_config.dtype):
        model = cls(
            model_config.arch,
            max_positions=model_config.max_model_len,
            fp8=model_config.quantization,
            kv_fp8=kv_fp8,
        )
    return model.eval()


def load_model(model_config: ModelConfig, device: torch.device, kv_fp8: bool = False) -> nn.Module:
    model = build_model(model_config, device, kv_fp8)
    if model_config.load_format == "dummy":
        tensors = synthetic_checkpoint(model_config.arch, model_config.seed, device)
    else:
        tensors = checkpoint_tensors(model_config.path)
    load_weights(model, tensors)
    return model


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files to read: the ones the index names, else every one in ``path``."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [file.name for file in files if not file.is_file()]
        if missing:
            raise ValueError(f"{index} names shards that are not in {path}: {missing[:5]}")
        return files
    check_safetensors(path)
    return sorted(path.glob("*.safetensors"))


def checkpoint_tensors(path: Path) -> Iterator[tuple[str, Any]]:
    """``(name, lazy slice)`` for every tensor; a slice reads from disk only what is indexed."""
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, handle.get_slice(name)


def checkpoint_shapes(arch: ModelArchConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a Hugging Face checkpoint of this architecture."""
    hidden, head_dim = arch.hidden_size, arch.head_dim
    q_size = arch.num_attention_heads * head_dim
    kv_size = arch.num_key_value_heads * head_dim
    yield "model.embed_tokens.weight", (arch.vocab_size, hidden)
    for i in range(arch.num_hidden_layers):
        prefix = f"model.layers.{i}"
        for proj, rows in (("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size)):
            yield f"{prefix}.self_attn.{proj}.weight", (rows, hidden)
            if arch.qkv_bias:
                yield f"{prefix}.self_attn.{proj}.bias", (rows,)
        yield f"{prefix}.self_attn.o_proj.weight", (hidden, q_size)
        if arch.o_proj_bias:
            yield f"{prefix}.self_attn.o_proj.bias", (hidden,)
        if arch.qk_norm:
            yield f"{prefix}.self_attn.q_norm.weight", (head_dim,)
            yield f"{prefix}.self_attn.k_norm.weight", (head_dim,)
        for proj in ("gate_proj", "up_proj"):
            yield f"{prefix}.mlp.{proj}.weight", (arch.intermediate_size, hidden)
            if arch.mlp_bias:
                yield f"{prefix}.mlp.{proj}.bias", (arch.intermediate_size,)
        yield f"{prefix}.mlp.down_proj.weight", (hidden, arch.intermediate_size)
        if arch.mlp_bias:
            yield f"{prefix}.mlp.down_proj.bias", (hidden,)
        yield f"{prefix}.input_layernorm.weight", (hidden,)
        yield f"{prefix}.post_attention_layernorm.weight", (hidden,)
    yield "model.norm.weight", (hidden,)
    if not arch.tie_word_embeddings:
        yield "lm_head.weight", (arch.vocab_size, hidden)


def synthetic_checkpoint(
    arch: ModelArchConfig, seed: int, device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """Random weights, deterministic per (seed, name, device): norms 1, biases 0, the rest
    normal with std 0.02, so any TP split of the same seed sees the same full tensors."""
    generator = torch.Generator(device=device)
    for name, shape in checkpoint_shapes(arch):
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, device=device)
        elif name.endswith(".bias"):
            yield name, torch.zeros(shape, device=device)
        else:
            generator.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            tensor = torch.empty(shape, device=device)
            tensor.normal_(0.0, DUMMY_STD, generator=generator)
            yield name, tensor


def load_weights(model: nn.Module, tensors: Iterator[tuple[str, Any]]) -> None:
    """Feed checkpoint tensors to parameter loaders; fail on unknown or missing weights."""
    params = dict(model.named_parameters())
    packed: dict[str, tuple[str, Any]] = getattr(model, "packed_modules_mapping", {})
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    expected = _expected_shards(params, packed)
    seen: set[tuple[str, Any]] = set()
    skipped = {"kv": 0, "input": 0}
    finishers = _finishers(model, expected)
    for name, source, target, shard_id in _targets(tensors, packed):
        if target is None or (tied and name == "lm_head.weight"):
            continue
        if target.endswith((".attn.k_scale", ".attn.v_scale")) and target not in params:
            skipped["kv"] += 1
            continue
        if target.endswith(".input_scale") and target not in params and _dynamic_fp8(model, target):
            skipped["input"] += 1  # a dynamic scheme computes its scales per token
            continue
        param = params.get(target)
        if param is None:
            raise ValueError(f"checkpoint tensor {name!r} matches no model parameter")
        if (target, shard_id) in seen:
            raise ValueError(f"checkpoint holds {name!r} twice")
        loader = getattr(param, "weight_loader", None)
        if loader is None:
            raise ValueError(f"parameter {target!r} has no weight loader")
        try:
            loader(param, source, shard_id) if shard_id is not None else loader(param, source)
        except ValueError as error:
            raise ValueError(f"while loading {name!r}: {error}") from error
        seen.add((target, shard_id))
        module = target.rsplit(".", 1)[0]
        if module in finishers:
            remaining = finishers[module][1]
            remaining.discard((target, shard_id))
            if not remaining:  # every shard is in: quantize now, before the next layer loads
                finishers.pop(module)[0].finish_loading()
    if skipped["kv"]:
        logger.info(
            "checkpoint holds %d KV-cache scales, unused: the KV cache is not fp8 "
            "(kv_cache_dtype='fp8' uses them)",
            skipped["kv"],
        )
    if skipped["input"]:
        logger.info(
            "skipped %d static input scales: activations are scaled per token", skipped["input"]
        )
    _warn_default_kv_scales(params, seen)
    missing = sorted(f"{n}[{s}]" if s is not None else n for n, s in expected - seen)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        shown = ", ".join(missing[:5]) + more
        raise ValueError(f"checkpoint lacks weights for: {shown}")


def _finishers(
    model: nn.Module, expected: set[tuple[str, Any]]
) -> dict[str, tuple[nn.Module, set[tuple[str, Any]]]]:
    """Modules with ``finish_loading`` (fp8 projections) and the shards each still awaits."""
    by_module: dict[str, set[tuple[str, Any]]] = {}
    for key in expected:
        by_module.setdefault(key[0].rsplit(".", 1)[0], set()).add(key)
    return {
        name: (module, by_module[name])
        for name, module in model.named_modules()
        if hasattr(module, "finish_loading") and by_module.get(name)
    }


def _dynamic_fp8(model: nn.Module, target: str) -> bool:
    """Whether ``target``'s module is an fp8 projection that scales its inputs per token."""
    try:
        module = model.get_submodule(target.rsplit(".", 1)[0])
    except AttributeError:
        return False
    fp8 = getattr(module, "fp8", None)
    return fp8 is not None and fp8.activation_scheme == "dynamic"


def _warn_default_kv_scales(params: dict[str, nn.Parameter], seen: set[tuple[str, Any]]) -> None:
    """An fp8 KV cache without checkpoint scales uses 1.0: values beyond 448 saturate."""
    scales = [name for name in params if name.endswith((".attn.k_scale", ".attn.v_scale"))]
    defaulted = [name for name in scales if (name, None) not in seen]
    if defaulted:
        logger.warning(
            "fp8 KV cache: %d of %d KV-cache scales are not in the checkpoint and are 1.0 "
            "(keys and values beyond +-448 saturate)",
            len(defaulted),
            len(scales),
        )


def _targets(
    tensors: Iterator[tuple[str, Any]], packed: dict[str, tuple[str, Any]]
) -> Iterator[tuple[str, Any, str | None, Any]]:
    """``(checkpoint name, source, parameter name or None to skip, shard id)``."""
    for name, source in tensors:
        if name.endswith(_IGNORED_SUFFIXES):
            yield name, source, None, None
            continue
        kv_suffix = next((s for s in _KV_SCALE_NAMES if name.endswith(s)), None)
        if kv_suffix is not None:
            for target_suffix in _KV_SCALE_NAMES[kv_suffix]:
                yield name, source, name[: -len(kv_suffix)] + target_suffix, None
            continue
        target, shard_id = _map_name(name, packed)
        yield name, source, target, shard_id


def _map_name(name: str, packed: dict[str, tuple[str, Any]]) -> tuple[str, Any]:
    for checkpoint_part, (packed_part, shard_id) in packed.items():
        needle = f".{checkpoint_part}."
        if needle in name:
            return name.replace(needle, f".{packed_part}."), shard_id
    return name, None


def _expected_shards(
    params: dict[str, nn.Parameter], packed: dict[str, tuple[str, Any]]
) -> set[tuple[str, Any]]:
    shards_of: dict[str, list[Any]] = {}
    for packed_part, shard_id in packed.values():
        shards_of.setdefault(packed_part, []).append(shard_id)
    expected = set()
    for name, param in params.items():
        if getattr(param, "optional", False):
            continue
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
        for shard_id in shards_of.get(module, [None]):
            expected.add((name, shard_id))
    return expected
