"""``/v1/chat/completions`` request and response bodies."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from ..chat_templates import MAX_CHAT_TEMPLATE_CHARS, MAX_TEMPLATE_KWARGS, message_text
from .protocol import (
    MAX_CONTENT_PARTS,
    MAX_MESSAGES,
    Count,
    PromptLogprobs,
    RequestModel,
    SamplingFields,
    UsageInfo,
    by_shape,
    logprobs_field,
)
from .structured_request import StructuredFields
from .tool_calls_history import template_tool_calls
from .tool_calls_protocol import (
    MAX_TOOL_CALL_ID,
    DeltaToolCall,
    ToolCallOut,
    ToolCallsIn,
    ToolChoice,
    Tools,
)


class TextContentPart(RequestModel):
    type: Literal["text"]
    text: str


#: A message's text, or its text content parts.
Content = by_shape(
    "content",
    f"a string or a list of at most {MAX_CONTENT_PARTS} text content parts",
    str=str,
    list=Annotated[list[TextContentPart], Field(fail_fast=True, max_length=MAX_CONTENT_PARTS)],
)


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content | None = None
    name: str | None = None
    tool_calls: ToolCallsIn | None = Field(None, description="An assistant's calls.")
    tool_call_id: str | None = Field(
        None, max_length=MAX_TOOL_CALL_ID, description="The call a tool message answers."
    )

    def text(self) -> str:
        """The content as text (parts joined as :func:`message_text` joins them)."""
        if isinstance(self.content, list):
            return message_text([{"type": "text", "text": part.text} for part in self.content])
        return message_text(self.content)

    def for_template(self, index: int) -> dict[str, Any]:
        """The message (number ``index``) as a chat template sees it."""
        return {
            "role": self.role,
            "content": self.text(),
            **({"name": self.name} if self.name else {}),
            **(
                {"tool_calls": template_tool_calls(self.tool_calls, index)}
                if self.tool_calls
                else {}
            ),
            **({"tool_call_id": self.tool_call_id} if self.tool_call_id is not None else {}),
        }


class ChatCompletionRequest(SamplingFields, StructuredFields):
    messages: Annotated[list[ChatMessage], Field(fail_fast=True)] = Field(
        min_length=1, max_length=MAX_MESSAGES
    )
    max_tokens: Annotated[Count, Field(ge=1)] | None = Field(
        None, description="Deprecated alias of the next."
    )
    max_completion_tokens: Annotated[Count, Field(ge=1)] | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = logprobs_field("Alternatives per position (needs logprobs).")
    tools: Tools | None = None
    tool_choice: ToolChoice | None = Field(
        None, description='"none", "auto" (the default with tools), "required" or a function.'
    )
    parallel_tool_calls: bool = True
    # Extras beyond OpenAI (as in vLLM).
    echo: bool = Field(
        False,
        description="Start the answer with the last message's content when that message "
        "is the assistant's.",
    )
    add_generation_prompt: bool = True
    continue_final_message: bool = Field(
        False,
        description="End the prompt inside the last (assistant) message, so that the "
        "answer continues it; needs add_generation_prompt false.",
    )
    chat_template: str | None = Field(
        None,
        max_length=MAX_CHAT_TEMPLATE_CHARS,
        description="A Jinja chat template for this request (needs the server's "
        "--trust-request-chat-template).",
    )
    chat_template_kwargs: (
        Annotated[dict[str, Any], Field(max_length=MAX_TEMPLATE_KWARGS)] | None
    ) = Field(None, description="Extra variables for the chat template.")


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCallOut] = Field(default_factory=list)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
