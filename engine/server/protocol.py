"""OpenAI protocol models shared by every endpoint: errors, usage, models, sampling fields.

Request models reject out-of-range values themselves (pydantic constraints), so a bad
parameter is a 400 naming that parameter before anything reaches the engine. Unknown fields
are ignored, as the OpenAI API tolerates newer clients.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from metroline.engine.sampling_params import MAX_LOGPROBS

#: OpenAI's own limit on ``n``.
MAX_N = 128
#: Seeds must fit a 64-bit generator seed, also after adding a sibling index (n > 1); powers
#: of two, so that the bounds survive JSON Schema's floating-point numbers exactly.
SEED_MIN, SEED_MAX = -(2**62), 2**62


#: Non-empty text (a prompt, a stop string).
NonEmptyStr = Annotated[str, Field(min_length=1)]
#: A non-empty list of token ids.
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class RequestModel(BaseModel):
    """Strict JSON types (``"1"`` is not a number, ``true`` is not 1), finite floats."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class StreamOptions(RequestModel):
    include_usage: bool | None = False


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "metroline"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class SamplingFields(RequestModel):
    """Sampling fields both endpoints share, OpenAI's and the vLLM extras."""

    model: str
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: NonEmptyStr | list[NonEmptyStr] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extras beyond OpenAI (as in vLLM).
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    skip_special_tokens: bool = True

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def logprobs_field(description: str):
    return Field(None, ge=0, le=MAX_LOGPROBS, description=description)
