"""Quantization settings, resolved before any process starts: which linear layers hold fp8
(e4m3) weights, where their scales come from, and the KV cache's element type.

Two sources of fp8 weights:

- **online** (``quantization="fp8"`` on a bf16/fp16/fp32 checkpoint, or dummy weights): each
  projection's weight is quantized once after loading, with one scale per output channel;
- **checkpoint**: ``config.json``'s ``quantization_config`` says ``quant_method: "fp8"``
  (vLLM/HF layout: ``weight_scale`` per tensor, optional static ``input_scale``) or
  ``"compressed-tensors"`` with 8-bit float weights (llm-compressor: ``weight_scale`` per
  channel or per tensor, activations dynamic per token or static per tensor).

Activations are quantized per token at run time (dynamic) unless the checkpoint gives a
static per-tensor ``input_scale``. Embeddings, norms and the LM head stay in the model dtype.
Anything else (block-wise scales, weight-only fp8, other bit widths or methods) is refused
here with the reason, never loaded approximately.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

#: Values of ``quantization`` / ``--quantization`` (None: as the checkpoint says).
QUANTIZATION_METHODS = ("fp8",)
#: Checkpoint ``quant_method`` values holding fp8 weights this engine loads.
CHECKPOINT_FP8_METHODS = ("fp8", "compressed-tensors")
#: Values of ``kv_cache_dtype`` / ``--kv-cache-dtype``; both fp8 spellings mean e4m3.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
ACTIVATION_SCHEMES = ("dynamic", "static")
#: Smallest compute capability with fp8 tensor cores (Ada, Hopper and later).
FP8_MIN_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class Fp8Config:
    """fp8 weights for the decoder's projections (q/k/v, o, gate/up, down).

    Invariant: ``activation_scheme == "static"`` only with ``from_checkpoint`` (a static
    scale must come from the checkpoint's ``input_scale`` tensors)."""

    #: The checkpoint holds fp8 weights and ``weight_scale`` tensors (False: quantize at load).
    from_checkpoint: bool
    activation_scheme: str = "dynamic"
    #: Checkpoint module names, or ``re:`` patterns matched in full, left unquantized.
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.activation_scheme not in ACTIVATION_SCHEMES:
            raise ValueError(f"activation_scheme must be one of {ACTIVATION_SCHEMES}")
        if self.activation_scheme == "static" and not self.from_checkpoint:
            raise ValueError("static activation scales need an fp8 checkpoint's input_scale")

    def ignores(self, module_name: str) -> bool:
        """Whether the checkpoint module ``module_name`` (e.g. ``model.layers.0.mlp.down_proj``)
        is left in the model dtype."""
        for entry in self.ignore:
            if entry.startswith("re:"):
                if re.fullmatch(entry[3:], module_name):
                    return True
            elif entry == module_name:
                return True
        return False

    def quantizes(self, module_names: list[str]) -> bool:
        """Whether one packed projection (its checkpoint modules, e.g. q/k/v) is fp8. The
        modules of one packed projection must agree: a matmul has one weight dtype."""
        ignored = [self.ignores(name) for name in module_names]
        if any(ignored) and not all(ignored):
            raise ValueError(
                f"the quantization config leaves only some of {module_names} unquantized; "
                "their weights are packed into one matmul and must share one precision"
            )
        return not any(ignored)


def resolve_quantization(
    requested: str | None, checkpoint: dict[str, Any] | None, load_format: str
) -> Fp8Config | None:
    """The fp8 settings for this run, or None for a model in its own dtype.

    ``requested`` is the user's ``quantization``; ``checkpoint`` the ``quantization_config``
    of config.json. Dummy weights are random model-dtype tensors, so a checkpoint's fp8
    config then means online quantization of them."""
    if requested is not None and requested not in QUANTIZATION_METHODS:
        raise ValueError(
            f"quantization must be one of {QUANTIZATION_METHODS} or unset; got {requested!r}"
        )
    if checkpoint is None:
        return None if requested is None else Fp8Config(from_checkpoint=False)
    if not isinstance(checkpoint, dict):
        raise ValueError("config.json's quantization_config must be a JSON object")
    method = checkpoint.get("quant_method")
    if method not in CHECKPOINT_FP8_METHODS:
        raise ValueError(
            f"checkpoint quantization method {method!r} is not supported; supported: fp8 "
            "checkpoints (quant_method 'fp8', or 'compressed-tensors' with 8-bit float "
            "weights), or a bf16/fp16 checkpoint with quantization='fp8'"
        )
    if method == "fp8":
        scheme, ignore = _parse_fp8(checkpoint)
    else:
        scheme, ignore = _parse_compressed_tensors(checkpoint)
    from_checkpoint = load_format != "dummy"
    return Fp8Config(
        from_checkpoint=from_checkpoint,
        activation_scheme=scheme if from_checkpoint else "dynamic",
        ignore=ignore,
    )


def _string_list(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"quantization_config.{what} must be a list of module names")
    return tuple(value)


def _parse_fp8(config: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """vLLM's / HF's ``quant_method: "fp8"``: per-tensor weight scales, activation scheme."""
    if config.get("weight_block_size") is not None:
        raise ValueError(
            "fp8 checkpoints with block-wise weight scales (weight_block_size) are not "
            "supported; supported: per-tensor or per-channel weight scales"
        )
    scheme = config.get("activation_scheme", "dynamic")
    if scheme not in ACTIVATION_SCHEMES:
        raise ValueError(
            f"quantization_config.activation_scheme must be one of {ACTIVATION_SCHEMES}; "
            f"got {scheme!r}"
        )
    ignore = _string_list(config.get("ignored_layers"), "ignored_layers")
    ignore += _string_list(config.get("modules_to_not_convert"), "modules_to_not_convert")
    return scheme, ignore


def _parse_compressed_tensors(config: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """llm-compressor's layout: every config group must be W8A8 fp8 on Linear layers."""
    if config.get("format") not in ("float-quantized", "naive-quantized"):
        raise ValueError(
            f"compressed-tensors format {config.get('format')!r} is not supported; supported: "
            "'float-quantized' (fp8 weights stored as e4m3 with their scales)"
        )
    groups = config.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError("compressed-tensors quantization_config needs config_groups")
    schemes = set()
    for name, group in groups.items():
        if not isinstance(group, dict):
            raise ValueError(f"compressed-tensors config group {name!r} must be an object")
        targets = group.get("targets")
        if targets != ["Linear"]:
            raise ValueError(
                f"compressed-tensors group {name!r} targets {targets!r}; supported: ['Linear']"
            )
        weights = group.get("weights") or {}
        if not _is_fp8(weights) or weights.get("strategy") not in ("channel", "tensor"):
            raise ValueError(
                f"compressed-tensors group {name!r}: weights must be 8-bit float with "
                f"'channel' or 'tensor' strategy; got {weights!r}"
            )
        if weights.get("dynamic") or weights.get("symmetric") is False:
            raise ValueError(f"compressed-tensors group {name!r}: weights must be static symmetric")
        activations = group.get("input_activations")
        if not activations:
            raise ValueError(
                f"compressed-tensors group {name!r} quantizes weights only; supported: fp8 "
                "weights with fp8 activations (W8A8)"
            )
        if not _is_fp8(activations):
            raise ValueError(
                f"compressed-tensors group {name!r}: input activations must be 8-bit float"
            )
        if activations.get("dynamic"):
            schemes.add("dynamic")
        elif activations.get("strategy") == "tensor":
            schemes.add("static")
        else:
            raise ValueError(
                f"compressed-tensors group {name!r}: static activation scales must be per "
                f"tensor; got strategy {activations.get('strategy')!r}"
            )
    if len(schemes) > 1:
        raise ValueError("compressed-tensors groups mix static and dynamic activation scales")
    return schemes.pop(), _string_list(config.get("ignore"), "ignore")


def _is_fp8(spec: dict[str, Any]) -> bool:
    return isinstance(spec, dict) and spec.get("num_bits") == 8 and spec.get("type") == "float"


def resolve_kv_cache_dtype(value: str) -> str:
    """``"auto"`` (the model dtype) or ``"fp8"`` (e4m3)."""
    if value not in KV_CACHE_DTYPES:
        raise ValueError(
            f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}; got {value!r} (fp8_e5m2 is not "
            "supported)"
        )
    return "auto" if value == "auto" else "fp8"


def check_fp8_device(device: Any, quantization: Fp8Config | None, kv_cache_dtype: str) -> None:
    """fp8 on CUDA needs compute capability 8.9 or later (Ada, Hopper); on the CPU the
    reference paths emulate fp8 (they dequantize with the same scales)."""
    uses = [
        name
        for name, used in (
            ("quantization='fp8'", quantization is not None),
            ("kv_cache_dtype='fp8'", kv_cache_dtype == "fp8"),
        )
        if used
    ]
    if not uses or device.type != "cuda":
        return
    import torch

    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < FP8_MIN_CAPABILITY:
        raise ValueError(
            f"{' and '.join(uses)} needs a GPU of compute capability 8.9 or later (Ada, "
            f"Hopper); this GPU is {capability[0]}.{capability[1]}"
        )
