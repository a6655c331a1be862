"""Which checkpoint the engine serves (or drafts with), in which precision, up to which
sequence length: :class:`ModelConfig`, resolved from a path or model id and checked against
the checkpoint's own ``config.json``. torch is imported only to resolve a dtype."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import ModelArchConfig, check_remote_code, check_safetensors, load_arch_config
from .generation_defaults import load_sampling_defaults
from .model_resolution import resolve_model_path
from .quantization import Fp8Config, resolve_quantization
from .rope_scaling import context_limit

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch

#: dtype names a user may give, and the torch dtype each means.
_DTYPES = {
    "float32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "float16": "float16",
    "half": "float16",
}
LOAD_FORMATS = ("auto", "safetensors", "dummy")


def resolve_dtype(dtype: str | torch.dtype, checkpoint_dtype: str | None) -> torch.dtype:
    """``"auto"`` takes the checkpoint's declared dtype (float32 when it declares none)."""
    import torch

    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be one of float32, bfloat16, float16; got {dtype}")
        return dtype
    if dtype == "auto":
        dtype = checkpoint_dtype or "float32"
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16'; got {dtype!r}")
    return getattr(torch, _DTYPES[dtype])


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint, in which precision, up to which sequence length."""

    path: Path
    arch: ModelArchConfig
    dtype: torch.dtype
    max_model_len: int
    load_format: str
    seed: int
    has_tokenizer: bool
    #: Where the tokenizer files are: the checkpoint, unless ``tokenizer`` names a folder.
    tokenizer_path: Path
    #: The model's default sampling parameters (SamplingParams fields; see
    #: :mod:`metroline.engine.generation_defaults`), {} for none.
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    #: fp8 weights (online or from the checkpoint), or None for the model dtype throughout.
    quantization: Fp8Config | None = None

    @classmethod
    def create(
        cls,
        model: str | Path,
        *,
        dtype: str | torch.dtype,
        max_model_len: int | None,
        load_format: str,
        seed: int,
        revision: str | None = None,
        tokenizer: str | None = None,
        trust_remote_code: bool = False,
        generation_config: str = "auto",
        quantization: str | None = None,
    ) -> ModelConfig:
        if load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}; got {load_format!r}")
        path = resolve_model_path(model, revision)
        check_remote_code(path, trust_remote_code)
        arch = load_arch_config(path)
        if load_format != "dummy":
            check_safetensors(path)
        limit, limit_reason = context_limit(arch.max_position_embeddings, arch.rope_scaling)
        if max_model_len is None:
            max_model_len = limit
        elif not isinstance(max_model_len, int) or max_model_len < 1:
            raise ValueError(f"max_model_len must be a positive integer; got {max_model_len!r}")
        elif max_model_len > limit:
            raise ValueError(f"max_model_len ({max_model_len}) exceeds the model's {limit_reason}")
        if arch.sliding_window is not None and max_model_len > arch.sliding_window:
            # Within the window, sliding-window attention equals full attention, so capping
            # the length keeps results exact without a windowed kernel.
            logger.warning(
                "model uses a sliding attention window of %d tokens: max_model_len capped "
                "from %d to %d",
                arch.sliding_window,
                max_model_len,
                arch.sliding_window,
            )
            max_model_len = arch.sliding_window
        tokenizer_path = path if tokenizer is None else Path(tokenizer).expanduser()
        has_tokenizer = any(
            (tokenizer_path / name).is_file()
            for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
        )
        if tokenizer is not None and not has_tokenizer:
            raise ValueError(
                f"tokenizer must be a folder holding tokenizer files (tokenizer.json, "
                f"tokenizer.model or tokenizer_config.json); {tokenizer!s} is not one"
            )
        return cls(
            path=path,
            arch=arch,
            dtype=resolve_dtype(dtype, arch.dtype),
            max_model_len=max_model_len,
            load_format=load_format,
            seed=seed,
            has_tokenizer=has_tokenizer,
            tokenizer_path=tokenizer_path,
            generation_defaults=load_sampling_defaults(path, generation_config),
            quantization=resolve_quantization(quantization, arch.quantization_config, load_format),
        )


def draft_model_config(model: str, target: ModelConfig) -> ModelConfig:
    """The draft model of speculative decoding (``speculative_config["model"]``), loaded
    like ``target``: same dtype, ``max_model_len``, load format and seed. Refused unless it
    has the target's vocabulary (its proposals are target token ids) and holds
    ``max_model_len`` tokens (a draft that cannot read the whole context would propose
    from a different one)."""
    try:
        draft = ModelConfig.create(
            model,
            dtype=target.dtype,
            max_model_len=target.max_model_len,
            load_format=target.load_format,
            seed=target.seed,
            generation_config="vllm",
        )
    except ValueError as error:
        raise ValueError(f"speculative_config model {model!r}: {error}") from None
    if draft.arch.vocab_size != target.arch.vocab_size:
        raise ValueError(
            f"speculative_config model {model!r}: its vocabulary ({draft.arch.vocab_size} "
            f"tokens) differs from the target's ({target.arch.vocab_size}); a draft model "
            "must share the target's tokenizer"
        )
    if draft.max_model_len != target.max_model_len:
        raise ValueError(
            f"speculative_config model {model!r}: it holds {draft.max_model_len} tokens "
            f"(sliding window), less than max_model_len={target.max_model_len}"
        )
    if vocabularies_differ(target.tokenizer_path, draft.tokenizer_path):
        logger.warning(
            "speculative_config model %r: its tokenizer maps tokens to ids differently from "
            "the target's, so its drafts will rarely be accepted (the output is the target's "
            "either way)",
            model,
        )
    return draft


#: Largest tokenizer.json compared (a tokenizer with a 256k vocabulary is about 20 MB).
MAX_TOKENIZER_JSON_BYTES = 64 * 2**20


def vocabularies_differ(first: Path, second: Path) -> bool | None:
    """Whether two tokenizer folders' ``tokenizer.json`` map tokens to different ids (the
    vocabulary and the added tokens); None when either has none or is too large to read."""
    files = [Path(folder) / "tokenizer.json" for folder in (first, second)]
    if not all(f.is_file() and f.stat().st_size <= MAX_TOKENIZER_JSON_BYTES for f in files):
        return None
    texts = [f.read_bytes() for f in files]
    if texts[0] == texts[1]:
        return False
    try:
        parsed = [json.loads(text) for text in texts]
    except ValueError:
        return None

    def ids(tokenizer: Any) -> tuple[Any, list[tuple[Any, Any]]]:
        model = tokenizer.get("model") if isinstance(tokenizer, dict) else None
        vocab = model.get("vocab") if isinstance(model, dict) else None
        added = tokenizer.get("added_tokens") if isinstance(tokenizer, dict) else None
        added = [(t.get("id"), t.get("content")) for t in added or [] if isinstance(t, dict)]
        return vocab, sorted(added, key=repr)

    return ids(parsed[0]) != ids(parsed[1])
