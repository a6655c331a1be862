"""Shared fixtures: tiny real Hugging Face checkpoints (random weights, real tokenizer).

Checkpoints are written with ``save_pretrained`` exactly as a hub model would be, so the
engine's loader sees real files. Weights use a large init std so that logits are well
separated and greedy decoding is decided by clear margins, not by rounding.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# As `metroline serve` does: idle OpenMP threads sleep, so a loaded machine does not turn
# each CPU step into a spin-wait contest (ten times slower, seen with both cores busy).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

VOCAB_SIZE = 512
EOS_ID = 0
BOS_ID = 1

# name -> (config class, model class, extra config)
ARCHS: dict[str, dict] = {
    "llama": {
        "model_type": "llama",
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    "mistral": {"model_type": "mistral", "sliding_window": None},
    "qwen2": {"model_type": "qwen2"},
    "qwen3": {"model_type": "qwen3", "tie_word_embeddings": True, "head_dim": 32},
}


def _train_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - 12,
        special_tokens=["<|endoftext|>", "<|bos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()
    tokenizer.train_from_iterator([corpus], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|bos|>", eos_token="<|endoftext|>"
    )
    fast.save_pretrained(str(directory))


def write_tiny_checkpoint(directory: Path, arch: str, seed: int = 0, **overrides) -> Path:
    """Write a 2-layer random checkpoint of ``arch`` with a tokenizer into ``directory``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(ARCHS[arch])
    model_type = spec.pop("model_type")
    kwargs = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": EOS_ID,
        "initializer_range": 0.25,
        "rms_norm_eps": 1e-6,
    }
    kwargs.update(spec)
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if model_type in ("qwen2",):
        with torch.no_grad():  # HF initialises biases to zero: make them matter
            for layer in model.model.layers:
                for proj in (
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                ):
                    proj.bias.normal_(0.0, 0.25)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    _train_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_checkpoint(arch)`` -> path of a cached tiny checkpoint of that architecture."""
    cache: dict[tuple, Path] = {}

    def make(arch: str = "llama", seed: int = 0, **overrides) -> Path:
        key = (arch, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"tiny-{arch}")
            cache[key] = write_tiny_checkpoint(directory, arch, seed, **overrides)
        return cache[key]

    return make
