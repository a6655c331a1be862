"""Loading the checkpoint's tokenizer (offline only)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def load_tokenizer(path: str | Path) -> Any:
    """The Hugging Face tokenizer stored beside the weights; never reaches a model hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
