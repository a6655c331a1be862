"""RoPE settings of a ``config.json``: the base, the scaling (llama3, linear, dynamic NTK, YaRN)
normalised with transformers' defaults, and the context length the scaling allows.

Both spellings occur on disk: ``rope_theta`` + ``rope_scaling`` (``type`` or ``rope_type``)
and transformers 5's ``rope_parameters`` (``rope_type``, ``rope_theta`` inside); where both
are present ``rope_scaling`` wins, as in transformers. Invariant: a returned scaling dict
holds ``rope_type`` and every parameter its frequencies need, so ``layers/rotary.py`` does
the arithmetic only. No torch here: the command line checks a model without loading it.
"""

from __future__ import annotations

import math
from typing import Any

#: Scaling types whose frequencies match transformers' (``layers/rotary.py``).
SUPPORTED_ROPE_TYPES = ("llama3", "linear", "dynamic", "yarn")
#: Types that transformers gives a pre-training length to (and where a top-level
#: ``original_max_position_embeddings`` wins over the one in the scaling dict).
_WITH_ORIGINAL_LENGTH = ("llama3", "yarn")


def parse_rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, scaling)`` of a parsed ``config.json``; scaling is None for plain RoPE.
    Raises ``ValueError`` naming an unsupported type or parameter."""
    params = raw.get("rope_parameters") or {}
    if any(isinstance(value, dict) for value in params.values()):
        raise ValueError(
            "rope_parameters per layer type are not supported (one RoPE for every layer is)"
        )
    scaling = dict(raw.get("rope_scaling") or params)
    # As transformers: the chosen dict's theta, else the top-level one.
    theta = float(scaling.get("rope_theta") or raw.get("rope_theta") or 10000.0)
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if float(scaling.get("partial_rotary_factor") or raw.get("partial_rotary_factor") or 1) != 1:
        raise ValueError("partial_rotary_factor is not supported: RoPE rotates whole heads")
    if kind == "default":
        return theta, None
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope scaling type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    scaling.pop("type", None)
    scaling["rope_type"] = kind
    max_positions = int(raw.get("max_position_embeddings", 2048))
    if kind in _WITH_ORIGINAL_LENGTH:
        original = raw.get("original_max_position_embeddings")
        original = original or scaling.get("original_max_position_embeddings") or max_positions
        scaling["original_max_position_embeddings"] = int(original)
    if kind == "yarn":
        _fill_yarn(scaling, max_positions)
    elif "factor" not in scaling:
        raise ValueError(f"rope scaling type {kind!r} needs a 'factor' in config.json")
    return theta, scaling


def _fill_yarn(scaling: dict[str, Any], max_positions: int) -> None:
    """transformers' YaRN defaults: the factor from the two lengths when absent, the attention
    factor (mscale) from the factor, beta_fast 32, beta_slow 1, truncation on."""
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor")
    factor = float(factor) if factor is not None else max_positions / original
    scaling["factor"] = factor

    def mscale(scale: float, weight: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * weight * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        weight, weight_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if weight and weight_all:
            attention_factor = mscale(factor, weight) / mscale(factor, weight_all)
        else:
            attention_factor = mscale(factor)
    scaling["attention_factor"] = float(attention_factor)
    scaling["beta_fast"] = scaling.get("beta_fast") or 32
    scaling["beta_slow"] = scaling.get("beta_slow") or 1
    scaling["truncate"] = scaling.get("truncate", True)


def context_limit(max_position_embeddings: int, scaling: dict[str, Any] | None) -> tuple[int, str]:
    """The longest ``max_model_len`` the model allows, and why, as vLLM derives it: linear
    scaling stretches ``max_position_embeddings`` by its factor, YaRN the pre-training length.
    Dynamic NTK is served within ``max_position_embeddings`` only: there transformers leaves
    the frequencies unscaled, beyond it transformers rescales them on every forward pass by
    that pass's longest position, which a KV cache shared by many requests cannot reproduce."""
    kind = None if scaling is None else scaling["rope_type"]
    if kind == "linear":
        factor = float(scaling["factor"])
        limit = int(max_position_embeddings * factor)
        return limit, (
            f"limit of {limit} tokens: max_position_embeddings ({max_position_embeddings}) "
            f"x the linear RoPE factor ({factor:g})"
        )
    if kind == "yarn":
        original, factor = scaling["original_max_position_embeddings"], scaling["factor"]
        limit = int(original * factor)
        return limit, (
            f"limit of {limit} tokens: original_max_position_embeddings ({original}) "
            f"x the YaRN factor ({factor:g})"
        )
    reason = f"max_position_embeddings ({max_position_embeddings})"
    if kind == "dynamic":
        reason += (
            "; dynamic NTK RoPE is served only within it, where transformers leaves the "
            "frequencies unscaled (beyond it, transformers rescales them per forward pass)"
        )
    return max_position_embeddings, reason
