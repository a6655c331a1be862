"""OpenAI protocol models shared by every endpoint: errors, usage, models, sampling fields.

Request models reject out-of-range values themselves (pydantic constraints), so a bad
parameter is a 400 naming that parameter before anything reaches the engine: every number
has a range, every list a length (the body as a whole has a byte limit, checked before it
is parsed). Fields that take one of several JSON shapes pick their member by the shape of
the value (a callable discriminator), so an error names the real problem (``prompt.0``:
"greater than or equal to 0") rather than every alternative.

Unknown fields, at any depth (``stream_options``, messages, content parts), are kept aside by
the models and listed by :func:`unknown_fields`: the routes answer 400 naming them, as
OpenAI's API does, or with ``--allow-unknown-fields`` log and ignore them. The OpenAPI
schema says ``additionalProperties: false`` (the default behaviour).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from ..sampling_params import (
    MAX_ALLOWED_TOKEN_IDS,
    MAX_BAD_WORD_CHARS,
    MAX_BAD_WORDS,
    MAX_COUNT,
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
)

#: Seeds must fit a 64-bit generator seed, also after adding a sibling index (n > 1); powers
#: of two, so that the bounds survive JSON Schema's floating-point numbers exactly.
SEED_MIN, SEED_MAX = -(2**62), 2**62
#: Most messages in one chat request (OpenAI's limit), and content parts in one message.
MAX_MESSAGES = 2048
MAX_CONTENT_PARTS = 64
#: Most prompts in one completion request (--max-sequences-per-request bounds prompts x n
#: further, and may not exceed this).
MAX_PROMPTS = 4096

#: A count (tokens to generate, ``top_k``): fits the engine's int32 tensors.
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
#: Non-empty text (a prompt).
NonEmptyStr = Annotated[str, Field(min_length=1)]
#: A token id (checked against the vocabulary by the engine).
TokenId = Annotated[int, Field(ge=0, le=MAX_COUNT)]
#: A non-empty list of token ids. Lists stop at their first bad item (``fail_fast``): a
#: million bad ids are one error, not a million.
TokenIds = Annotated[list[TokenId], Field(fail_fast=True, min_length=1)]
#: One stop string.
StopStr = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
#: One bad word (SamplingParams also refuses a word of only spaces).
BadWord = Annotated[str, Field(min_length=1, max_length=MAX_BAD_WORD_CHARS)]


def by_shape(name: str, choices: str, **members: Any) -> Any:
    """A union whose member is chosen by the JSON shape of the value: ``members`` maps a
    shape (``str``, ``list``, ``list_of_str``, ``list_of_list``, ``list_of_other``) to its
    type; a value of any other shape fails with "``name`` must be ``choices``". Member tags
    are not identifiers, so error locations skip them (see errors._validation_param)."""

    def shape(value: Any) -> str | None:
        if isinstance(value, str):
            key = "str"
        elif isinstance(value, list):
            first = value[0] if value else None
            key = "list"
            if "list" not in members:
                key = {str: "list_of_str", list: "list_of_list"}.get(type(first), "list_of_other")
        else:
            return None
        return f"<{key}>" if key in members else None

    tagged = tuple(Annotated[kind, Tag(f"<{key}>")] for key, kind in members.items())
    return Annotated[
        Union[tagged],  # noqa: UP007 - a runtime tuple of members
        Discriminator(
            shape,
            custom_error_type="invalid_shape",
            custom_error_message=f"{name} must be {choices}",
        ),
    ]


Stop = by_shape(
    "stop",
    f"a string or a list of at most {MAX_STOP_STRINGS} strings",
    str=StopStr,
    list=Annotated[list[StopStr], Field(fail_fast=True, max_length=MAX_STOP_STRINGS)],
)


class RequestModel(BaseModel):
    """Strict JSON types (``"1"`` is not a number, ``true`` is not 1), finite floats; unknown
    fields kept in ``model_extra`` for :func:`unknown_fields`."""

    model_config = ConfigDict(
        extra="allow",
        allow_inf_nan=False,
        strict=True,
        json_schema_extra={"additionalProperties": False},
    )


def unknown_fields(model: BaseModel, prefix: str = "") -> Iterator[str]:
    """The dotted paths of the unknown fields in a parsed request, depth first
    (``stream_options.x``, ``messages.0.content.1.x``). Lazy: a caller that needs a few
    names stops early."""
    for name in model.model_extra or ():
        yield prefix + name
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield from unknown_fields(value, f"{prefix}{name}.")
        elif isinstance(value, list) and value and isinstance(value[-1], BaseModel):
            for index, item in enumerate(value):
                yield from unknown_fields(item, f"{prefix}{name}.{index}.")


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


class PromptLogprob(BaseModel):
    """One prompt token's log-probability (vLLM's shape of ``prompt_logprobs`` entries)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


#: Per prompt token, its and the top alternatives' log-probabilities keyed by token id;
#: ``None`` for the first token (nothing precedes it).
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class StreamOptions(RequestModel):
    include_usage: bool | None = False
    #: Usage in every chunk, not only in the last one (with ``include_usage``).
    continuous_usage_stats: bool | None = False


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
    stop: Stop | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extras beyond OpenAI (as in vLLM).
    top_k: int | None = Field(None, ge=-1, le=MAX_COUNT)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    ignore_eos: bool = False
    min_tokens: Count = 0
    stop_token_ids: (
        Annotated[list[TokenId], Field(fail_fast=True, max_length=MAX_STOP_TOKEN_IDS)] | None
    ) = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    allowed_token_ids: (
        Annotated[
            list[TokenId], Field(fail_fast=True, min_length=1, max_length=MAX_ALLOWED_TOKEN_IDS)
        ]
        | None
    ) = Field(None, description="Only these tokens may be generated.")
    bad_words: Annotated[list[BadWord], Field(fail_fast=True, max_length=MAX_BAD_WORDS)] | None = (
        Field(None, description="Words never generated (as vLLM's bad_words).")
    )
    prompt_logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="Log-probabilities of each prompt token and its top N alternatives.",
    )
    truncate_prompt_tokens: int | None = Field(
        None,
        ge=-1,
        le=MAX_COUNT,
        description="Keep only the prompt's last N tokens (1 to max_model_len; -1: max_model_len).",
    )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Usage in every streamed chunk (``continuous_usage_stats`` with ``include_usage``)."""
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)


def logprobs_field(description: str):
    return Field(None, ge=0, le=MAX_LOGPROBS, description=description)
