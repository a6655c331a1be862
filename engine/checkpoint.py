"""What a checkpoint directory holds besides the weights: ``config.json`` read into the few
facts the Llama-family models need, and the tokenizer (with the fastest exact way to encode).

We parse the JSON ourselves instead of relying on one ``transformers`` version's config
classes: key names moved between releases (``rope_scaling``/``rope_theta`` became
``rope_parameters``, ``torch_dtype`` became ``dtype``) and both spellings occur on disk.
The tokenizer is loaded from local files only; no model hub is ever reached.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .rope_scaling import parse_rope

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)


@dataclass(frozen=True)
class ModelArchConfig:
    """Shape and flavour of a Llama-family checkpoint. Invariant: heads divide evenly."""

    architecture: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    qk_norm: bool
    #: Attention window in tokens when some layer uses one, else None.
    sliding_window: int | None
    #: The dtype the checkpoint declares ("float32", "bfloat16", ...), or None.
    dtype: str | None
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    #: config.json's ``quantization_config`` as written, or None (see
    #: :mod:`metroline.engine.quantization`).
    quantization_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )


def load_arch_config(model_dir: str | Path) -> ModelArchConfig:
    """Parse ``model_dir/config.json`` (and ``generation_config.json`` for EOS ids)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"no config.json in {model_dir!s}: expected a Hugging Face checkpoint")
    raw = json.loads(path.read_text())
    return parse_arch_config(raw, load_generation_config(model_dir))


#: Largest ``generation_config.json`` read (real ones are well under a kilobyte).
MAX_GENERATION_CONFIG_BYTES = 1 << 20


def load_generation_config(folder: str | Path) -> dict[str, Any]:
    """``folder/generation_config.json`` as a dict ({} when there is none): EOS ids and the
    model's default sampling parameters (see :mod:`metroline.engine.generation_defaults`)."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    if path.stat().st_size > MAX_GENERATION_CONFIG_BYTES:
        raise ValueError(f"{path} is larger than {MAX_GENERATION_CONFIG_BYTES} bytes")
    try:
        raw = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return raw


def parse_arch_config(
    raw: dict[str, Any], gen_raw: dict[str, Any] | None = None
) -> ModelArchConfig:
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ValueError(
            f"unsupported architecture {archs!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    hidden = int(raw["hidden_size"])
    heads = int(raw["num_attention_heads"])
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    head_dim = int(raw.get("head_dim") or hidden // heads)

    rope_theta, rope_scaling = parse_rope(raw)

    attention_bias = bool(raw.get("attention_bias", False))
    if arch == "Qwen2ForCausalLM":
        qkv_bias, o_bias = True, False
    else:
        qkv_bias = o_bias = attention_bias

    sliding_window = raw.get("sliding_window")
    qwen = arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM")
    if qwen and not raw.get("use_sliding_window", False):
        sliding_window = None
    layer_types = raw.get("layer_types")
    if layer_types is not None and "sliding_attention" not in layer_types:
        sliding_window = None

    eos: list[int] = []
    for source in (raw, gen_raw or {}):
        value = source.get("eos_token_id")
        for token in value if isinstance(value, list) else [value]:
            if token is not None and int(token) not in eos:
                eos.append(int(token))
    dtype = raw.get("dtype") or raw.get("torch_dtype")
    return ModelArchConfig(
        architecture=arch,
        hidden_size=hidden,
        num_hidden_layers=int(raw["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(raw["intermediate_size"]),
        vocab_size=int(raw["vocab_size"]),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_proj_bias=o_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        qk_norm=arch == "Qwen3ForCausalLM",
        sliding_window=int(sliding_window) if sliding_window else None,
        dtype=str(dtype) if dtype else None,
        eos_token_ids=tuple(eos),
        bos_token_id=raw.get("bos_token_id"),
        quantization_config=raw.get("quantization_config"),
    )


def check_remote_code(model_dir: Path, trust_remote_code: bool) -> None:
    """The engine never runs code shipped with a checkpoint: ``trust_remote_code=True`` is
    a ``ValueError`` unless the architecture is one implemented here (then a warning that
    the flag is ignored)."""
    if not isinstance(trust_remote_code, bool):
        raise ValueError(f"trust_remote_code must be true or false; got {trust_remote_code!r}")
    if not trust_remote_code:
        return
    path = model_dir / "config.json"
    archs = (json.loads(path.read_text()).get("architectures") or []) if path.is_file() else []
    native = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
    if native:
        logger.warning(
            "trust_remote_code=True is ignored: %s is implemented natively and no code from "
            "the checkpoint runs",
            native[0],
        )
        return
    raise ValueError(
        f"trust_remote_code=True: custom model code is not supported (no code from a "
        f"checkpoint ever runs); {model_dir} declares {archs!r}, and the natively "
        f"implemented architectures are {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


#: Weight files of other formats, named when a directory has no safetensors.
_OTHER_WEIGHT_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.gguf")


def check_safetensors(model_dir: Path) -> None:
    """Raise ``ValueError`` unless ``model_dir`` holds ``*.safetensors`` weights, naming the
    weights of other formats it holds instead."""
    if any(model_dir.glob("*.safetensors")):
        return
    others = sorted(p.name for pattern in _OTHER_WEIGHT_PATTERNS for p in model_dir.glob(pattern))
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise ValueError(
            f"safetensors required: {model_dir} holds weights only as {shown}, which the engine "
            "does not load (unpickling .bin/.pt files can run code); convert them to "
            "*.safetensors (transformers: from_pretrained, then save_pretrained) or use a "
            "revision that has them"
        )
    raise ValueError(
        f"no *.safetensors files in {model_dir}; pass load_format='dummy' for random weights"
    )


# ---- tokenizer ----------------------------------------------------------------------------

#: Encodes ``(text, add_special_tokens, limit)`` to token ids; raises
#: :class:`PromptTooLongError` when there are more than ``limit`` (None: no limit).
Encoder = Callable[[str, bool, int | None], list[int]]


class PromptTooLongError(ValueError):
    """A text has more tokens than allowed (their ids were never turned into Python ints:
    for a huge prompt that alone would hold the GIL, and so the event loop, for a second)."""

    def __init__(self, num_tokens: int, limit: int) -> None:
        super().__init__(f"the prompt has {num_tokens} tokens, more than the {limit} allowed")
        self.num_tokens = num_tokens
        self.limit = limit


#: Text whose ids both ways of encoding must agree on: spaces and newlines, digits, accents,
#: CJK, emoji and a special-token string.
_PROBE = "Hello, world!\n\n  def f(x):\treturn x ** 2  # 12345 naïve café 日本語 🙂 "


def load_tokenizer(path: str | Path) -> Any:
    """The Hugging Face tokenizer stored beside the weights; never reaches a model hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def make_encoder(tokenizer: Any) -> Encoder:
    """The Rust tokenizer's ``encode_batch_fast`` (no character offsets: several times less
    work on long prompts) when it gives the same ids as the tokenizer's own ``__call__`` on a
    probe text, with and without special tokens; otherwise ``__call__``."""

    def with_call(text: str, add_special_tokens: bool, limit: int | None = None) -> list[int]:
        ids = list(tokenizer(text, add_special_tokens=add_special_tokens).input_ids)
        if limit is not None and len(ids) > limit:
            raise PromptTooLongError(len(ids), limit)
        return ids

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return with_call

    def with_backend(text: str, add_special_tokens: bool, limit: int | None = None) -> list[int]:
        (encoding,) = backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)
        if limit is not None and len(encoding) > limit:
            raise PromptTooLongError(len(encoding), limit)
        return encoding.ids

    probe = _PROBE + str(getattr(tokenizer, "eos_token", None) or "")
    for special in (True, False):
        if with_backend(probe, special) != with_call(probe, special):
            logger.info("the tokenizer's own encoding differs from its Rust backend's: using it")
            return with_call
    return with_backend
