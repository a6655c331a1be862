"""``/tokenize`` and ``/detokenize`` bodies, shaped as vLLM's (which serves them beside, not
under, ``/v1``). A tokenize request is a completion's (``prompt``) or a chat's (``messages``,
rendered by the chat template as ``/v1/chat/completions`` renders them); which one is told by
the presence of ``messages``."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Discriminator, Field, Tag

from ..chat_templates import MAX_CHAT_TEMPLATE_CHARS, MAX_TEMPLATE_KWARGS
from .protocol import MAX_MESSAGES, RequestModel, TokenId
from .protocol_chat import ChatMessage


class TokenizeCompletionRequest(RequestModel):
    model: str | None = Field(None, description="A served model name (default: the first).")
    prompt: str
    add_special_tokens: bool = Field(
        True, description="Add the tokenizer's special tokens (e.g. BOS), as a completion does."
    )
    return_token_strs: bool = Field(False, description="Also answer each token's string.")


class TokenizeChatRequest(RequestModel):
    model: str | None = Field(None, description="A served model name (default: the first).")
    messages: Annotated[list[ChatMessage], Field(fail_fast=True)] = Field(
        min_length=1, max_length=MAX_MESSAGES
    )
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = Field(
        False, description="Add special tokens on top of what the chat template adds."
    )
    return_token_strs: bool = Field(False, description="Also answer each token's string.")
    chat_template: str | None = Field(
        None,
        max_length=MAX_CHAT_TEMPLATE_CHARS,
        description="A Jinja chat template (needs the server's --trust-request-chat-template).",
    )
    chat_template_kwargs: (
        Annotated[dict[str, Any], Field(max_length=MAX_TEMPLATE_KWARGS)] | None
    ) = Field(None, description="Extra variables for the chat template.")


def _kind(value: Any) -> str:
    # Tags are not identifiers, so that error locations leave them out (errors.py).
    return "<chat>" if isinstance(value, dict) and "messages" in value else "<completion>"


TokenizeRequest = Annotated[
    Annotated[TokenizeCompletionRequest, Tag("<completion>")]
    | Annotated[TokenizeChatRequest, Tag("<chat>")],
    Discriminator(_kind),
]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestModel):
    model: str | None = Field(None, description="A served model name (default: the first).")
    tokens: Annotated[list[TokenId], Field(fail_fast=True)] = Field(
        description="Token ids below the vocabulary size, at most max_model_len of them."
    )


class DetokenizeResponse(BaseModel):
    prompt: str
