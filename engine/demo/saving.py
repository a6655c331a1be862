"""Writing the demo checkpoint: ``save_pretrained`` plus the keys older readers look for."""

from __future__ import annotations

import json
import logging
import pathlib

import torch
from transformers import GenerationConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .tokenization import CHAT_TEMPLATE

log = logging.getLogger(__name__)


def save_checkpoint(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out: pathlib.Path, max_mb: float
) -> None:
    """Write ``model`` and ``tokenizer`` to ``out`` with ``save_pretrained``.

    The weights are saved in fp32 when they fit ``max_mb`` (10^6 bytes), otherwise in bf16, with
    the config's ``dtype`` matching; the generation config is greedy with BOS = EOS = pad = EOS.
    The model is converted to that dtype in place.
    """
    n_params = sum(p.numel() for p in model.parameters())
    save_dtype = torch.float32 if n_params * 4 <= max_mb * 1e6 else torch.bfloat16
    model.to(save_dtype)
    model.config.dtype = save_dtype
    eos = tokenizer.eos_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, do_sample=False
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    write_compat_keys(out)
    weights = (out / "model.safetensors").stat().st_size
    log.info(
        "wrote %s: %.2fM parameters, %s weights %d bytes (%.2f MB)",
        out,
        n_params / 1e6,
        str(save_dtype).removeprefix("torch."),
        weights,
        weights / 1e6,
    )


def write_compat_keys(out: pathlib.Path) -> None:
    """Add the keys older ``transformers`` (4.x) and plain-JSON readers look for.

    ``save_pretrained`` from transformers 5 writes ``dtype``, ``rope_parameters``, a separate
    ``chat_template.jinja`` and ``tokenizer_class: TokenizersBackend``; this adds ``torch_dtype``,
    ``rope_theta``, the chat template in ``tokenizer_config.json`` and the class name every
    version knows, ``PreTrainedTokenizerFast``. Newer versions read both spellings.
    """
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config.setdefault("torch_dtype", config.get("dtype"))
    config.setdefault("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta"))
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok_path = out / "tokenizer_config.json"
    tok_config = json.loads(tok_path.read_text())
    tok_config.update(
        tokenizer_class="PreTrainedTokenizerFast",
        chat_template=CHAT_TEMPLATE,
        add_bos_token=False,
        add_eos_token=False,
    )
    tok_path.write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n")
    for path in out.iterdir():
        path.chmod(0o644)
