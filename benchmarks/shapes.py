"""Model shapes used by benchmarks (benchmarks/README.md), written as real ``config.json`` files.

Weights come from ``load_format="dummy"`` (engine) or random init (transformers), so only
the config is written. Every shape is a real Hugging Face architecture.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 14336,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "rope_scaling": _LLAMA3_ROPE,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "torch_dtype": "bfloat16",
    },
    # Llama 3.2 1B's layout with llama3-8b's context and RoPE (a draft model shares the
    # target's vocabulary and must hold its max_model_len).
    "llama3-1b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "intermediate_size": 8192,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "rope_scaling": _LLAMA3_ROPE,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "torch_dtype": "bfloat16",
    },
    "llama3-70b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 8192,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 28672,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "rope_scaling": _LLAMA3_ROPE,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "torch_dtype": "bfloat16",
    },
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": 1024,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 3072,
        "vocab_size": 151936,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "torch_dtype": "bfloat16",
    },
    "qwen2.5-32b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 5120,
        "num_hidden_layers": 64,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "intermediate_size": 27648,
        "vocab_size": 152064,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "torch_dtype": "bfloat16",
    },
    "tiny": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 512,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 1,
        "eos_token_id": 0,
        "torch_dtype": "float32",
    },
}


def write_shape(name: str, directory: Path, **overrides: Any) -> Path:
    """Write ``directory/config.json`` for the named shape, with ``overrides`` of its fields
    (e.g. fewer ``num_hidden_layers``); returns ``directory``."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(SHAPES[name] | overrides, indent=2))
    return directory


def weight_bytes(name: str, bytes_per_param: int = 2, fp8_projections: bool = False) -> int:
    """Bytes of the model's weights (embeddings and LM head included); ``fp8_projections``:
    the decoder's projections hold one byte per weight (``quantization="fp8"``), the rest
    ``bytes_per_param``."""
    c = SHAPES[name]
    hidden, layers, inter, vocab = (
        c["hidden_size"],
        c["num_hidden_layers"],
        c["intermediate_size"],
        c["vocab_size"],
    )
    head_dim = c.get("head_dim", hidden // c["num_attention_heads"])
    q = c["num_attention_heads"] * head_dim
    kv = c["num_key_value_heads"] * head_dim
    projections = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inter
    embeddings = vocab * hidden * (1 if c.get("tie_word_embeddings") else 2)
    rest = layers * 2 * hidden + embeddings + hidden
    projection_bytes = 1 if fp8_projections else bytes_per_param
    return projection_bytes * layers * projections + bytes_per_param * rest


def param_count(name: str) -> int:
    """Parameters of the model (embeddings and LM head included)."""
    return weight_bytes(name, bytes_per_param=1)
