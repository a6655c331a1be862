"""Metroline's embedded demo model: a small Llama trained on the Python standard library.

The checkpoint in ``model/`` (a ``LlamaForCausalLM`` plus a byte-level BPE tokenizer, loadable
offline with ``AutoModelForCausalLM`` / ``AutoTokenizer``) is what ``make serve`` serves, so the
server starts on any machine without a download. ``train.py`` rebuilds it from the running
Python's own standard library source; ``README.md`` records how and how well.
"""

from __future__ import annotations

import pathlib

__all__ = ["demo_model_path"]


def demo_model_path() -> pathlib.Path:
    """Return the folder holding the demo checkpoint (config, weights and tokenizer files)."""
    return pathlib.Path(__file__).resolve().parent / "model"
