"""The model's default sampling parameters, from its ``generation_config.json``, as vLLM's
``--generation-config`` applies them.

``generation_config`` is ``"auto"`` (the checkpoint's file), ``"vllm"`` (none: the neutral
:class:`~metroline.engine.sampling_params.SamplingParams` defaults) or a folder holding a
``generation_config.json``. The fields read are vLLM's: ``temperature``, ``top_p``,
``top_k``, ``min_p``, ``repetition_penalty`` and ``max_new_tokens`` (as ``max_tokens``);
like vLLM (which takes the file's difference from Hugging Face's ``GenerationConfig()``) a
value equal to Hugging Face's own default is not the model's choice and is skipped
(``top_k: 50`` among them). An extension over vLLM, which ignores it: ``do_sample: false``
means greedy decoding (temperature 0), as ``transformers``' ``generate()`` does.

They apply where a request leaves a field unset: ``LLM.generate`` without sampling
parameters (``LLM.get_default_sampling_params()``), and every field a server request omits.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .checkpoint import load_generation_config
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)

#: ``generation_config`` values besides a folder.
GENERATION_CONFIG_SOURCES = ("auto", "vllm")
#: ``generation_config.json`` key -> SamplingParams field.
_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}
#: Hugging Face's ``GenerationConfig()`` defaults: a file holding these says nothing.
_HF_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}
_COUNTS = ("top_k", "max_tokens")


def sampling_defaults(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The SamplingParams fields that a parsed ``generation_config.json`` sets."""
    defaults: dict[str, Any] = {}
    for key, name in _FIELDS.items():
        value = raw.get(key)
        if value is None or (key in _HF_DEFAULTS and value == _HF_DEFAULTS[key]):
            continue
        if name in _COUNTS and isinstance(value, float) and value.is_integer():
            value = int(value)
        defaults[name] = value
    if raw.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return defaults


def load_sampling_defaults(model_dir: Path, generation_config: str) -> dict[str, Any]:
    """The defaults ``generation_config`` selects for the checkpoint in ``model_dir``.
    Raises ``ValueError`` naming the file when a value is out of range."""
    if not isinstance(generation_config, str) or not generation_config:
        raise ValueError(
            "generation_config must be 'auto', 'vllm' or a folder holding generation_config.json;"
            f" got {generation_config!r}"
        )
    if generation_config == "vllm":
        return {}
    folder = model_dir if generation_config == "auto" else Path(generation_config)
    if generation_config != "auto" and not (folder / "generation_config.json").is_file():
        raise ValueError(
            "generation_config must be 'auto', 'vllm' or a folder holding generation_config.json;"
            f" {generation_config!r} holds none"
        )
    defaults = sampling_defaults(load_generation_config(folder))
    try:
        SamplingParams(**defaults)
    except ValueError as error:
        raise ValueError(
            f"{folder / 'generation_config.json'}: {error}; pass generation_config='vllm' "
            "(--generation-config vllm) to ignore the model's defaults"
        ) from None
    if defaults:
        logger.info(
            "default sampling parameters from %s: %s (generation_config='vllm' ignores them)",
            folder / "generation_config.json",
            ", ".join(f"{k}={v}" for k, v in defaults.items()),
        )
    return defaults


def default_sampling_params(defaults: Mapping[str, Any]) -> SamplingParams:
    """SamplingParams with the model's defaults for the fields they set."""
    return SamplingParams(**defaults)


def request_sampling_fields(
    requested: Mapping[str, Any], defaults: Mapping[str, Any]
) -> dict[str, Any]:
    """SamplingParams keyword arguments for a server request. ``requested`` maps fields to
    the request's values, None where it left a field unset: the values it sets win, the
    model's defaults fill the others (``max_tokens`` excepted: see
    :func:`default_max_tokens`), SamplingParams' own defaults the rest."""
    fields = {k: v for k, v in defaults.items() if k != "max_tokens"}
    fields.update({k: v for k, v in requested.items() if v is not None})
    return fields


def default_max_tokens(defaults: Mapping[str, Any], room: int) -> int:
    """Tokens a request that sets no ``max_tokens`` may generate: what fits after its
    prompt (``room``), capped by the model's ``max_new_tokens`` when it has one."""
    limit = defaults.get("max_tokens")
    return room if limit is None else min(room, limit)
