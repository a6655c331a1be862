"""Architecture name -> model class."""

from __future__ import annotations

from torch import nn

from ..checkpoint import SUPPORTED_ARCHITECTURES
from .llama import LlamaForCausalLM

MODEL_CLASSES: dict[str, type[nn.Module]] = dict.fromkeys(SUPPORTED_ARCHITECTURES, LlamaForCausalLM)


def model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODEL_CLASSES[architecture]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: "
            + ", ".join(sorted(MODEL_CLASSES))
        ) from None
