"""Loading the checkpoint's tokenizer (offline only), and the fastest exact way to encode
with it."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

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
