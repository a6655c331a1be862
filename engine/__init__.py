"""Metroline engine: paged KV cache, continuous batching, offline and HTTP serving.

Public API (vLLM-shaped): :class:`LLM`, :class:`SamplingParams`, :class:`RequestOutput`,
:class:`CompletionOutput`, :class:`Logprob`. They load on first use, so that importing a
part of the engine (the API server, the client) never loads the others (the core, the
workers, the kernels).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy_exports import lazy_exports

if TYPE_CHECKING:
    from .llm import LLM
    from .outputs import CompletionOutput, Logprob, RequestOutput
    from .sampling_params import SamplingParams

_PUBLIC = {
    "LLM": ".llm",
    "CompletionOutput": ".outputs",
    "Logprob": ".outputs",
    "RequestOutput": ".outputs",
    "SamplingParams": ".sampling_params",
}

__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams"]

__getattr__ = lazy_exports(__name__, _PUBLIC)
