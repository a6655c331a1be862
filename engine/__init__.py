"""Metroline engine: paged KV cache, continuous batching, offline and HTTP serving.

Public API (vLLM-shaped): :class:`LLM`, :class:`SamplingParams`, :class:`RequestOutput`,
:class:`CompletionOutput`.
"""

from metroline.engine.llm import LLM
from metroline.engine.outputs import CompletionOutput, Logprob, RequestOutput
from metroline.engine.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams"]
