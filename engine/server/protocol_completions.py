"""``/v1/completions`` request and response bodies (OpenAI's legacy completions API)."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from ..sampling_params import MAX_N
from .protocol import (
    MAX_PROMPTS,
    Count,
    NonEmptyStr,
    PromptLogprobs,
    SamplingFields,
    TokenIds,
    UsageInfo,
    by_shape,
    logprobs_field,
)
from .structured_request import StructuredFields

#: A string, a list of strings, token ids, or a list of token-id lists (how many prompts one
#: request may carry is the server's --max-sequences-per-request, with ``n``).
Prompt = by_shape(
    "prompt",
    "a string, a list of strings, a list of token ids or a list of token-id lists",
    str=NonEmptyStr,
    list_of_str=Annotated[
        list[NonEmptyStr], Field(fail_fast=True, min_length=1, max_length=MAX_PROMPTS)
    ],
    list_of_list=Annotated[
        list[TokenIds], Field(fail_fast=True, min_length=1, max_length=MAX_PROMPTS)
    ],
    list_of_other=TokenIds,
)


class CompletionRequest(SamplingFields, StructuredFields):
    prompt: Prompt
    max_tokens: Annotated[Count, Field(ge=1)] | None = 16
    logprobs: int | None = logprobs_field("Log-probabilities of the top N tokens per position.")
    echo: bool | None = False
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: str | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
