"""``POST /v1/chat/completions``: the tokenizer's chat template turns ``messages`` into one
prompt (with the generation prompt added); ``n`` choices come from one engine request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ...client.async_llm import AsyncLLM, RequestStream
from ...client.input_processor import ProcessedPrompt, PromptTooLongError
from ...outputs import CompletionOutput, PositionLogprobs, RequestOutput
from .. import admission, engine_calls
from ..errors import bad_request
from ..json_body import StrictJSONRoute
from ..logprobs import chat_logprobs
from ..protocol_chat import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    ChoiceLogprobs,
    DeltaMessage,
)
from ..responses import GENERATION_RESPONSES
from ..state import ServerState
from ..streaming import StreamCursors

router = APIRouter(route_class=StrictJSONRoute)


def render_prompt(engine: AsyncLLM, body: ChatCompletionRequest) -> str:
    tokenizer = engine.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise bad_request("this model has no chat template; use /v1/completions", param="messages")
    conversation: list[dict[str, Any]] = [
        {"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
        for m in body.messages
    ]
    try:
        return tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
    except Exception as error:  # a template may reject any conversation
        raise bad_request(f"the chat template rejected the messages: {error}", "messages") from None


def _check(body: ChatCompletionRequest) -> None:
    admission.reject_unsupported(body)
    if body.tools:
        raise bad_request("tools are not supported", param="tools")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise bad_request("only response_format type 'text' is supported", "response_format")
    if body.top_logprobs and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs")


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses=GENERATION_RESPONSES,
    summary="Create a chat completion",
)
async def create_chat_completion(
    body: ChatCompletionRequest,
    raw_request: Request,
    state: admission.StateDep,
) -> Response:
    engine = admission.admit(state, body.model)
    _check(body)
    admission.check_sequences(state, 1, body.n)
    try:
        processed = await admission.prepare(state, raw_request, _process, state, engine, body)
    except admission.ClientGone:
        return Response(status_code=499)
    if body.stream:
        streams = engine_calls.start(engine, [processed], stream=True)
        return StreamingResponse(
            _stream(state, body, processed.request_id, streams),
            media_type="text/event-stream",
        )
    try:
        streams = engine_calls.start(engine, [processed], False)
        (output,) = await engine_calls.final_outputs(streams, raw_request)
    except admission.ClientGone:
        return Response(status_code=499)
    return await state.off_loop(
        lambda: JSONResponse(_response(state, body, output).model_dump()), respond=True
    )


def _process(state: ServerState, engine: AsyncLLM, body: ChatCompletionRequest) -> ProcessedPrompt:
    """Render the template, tokenise and validate (a worker thread: this grows with the
    input)."""
    prompt = render_prompt(engine, body)
    requested, param = body.max_completion_tokens, "max_completion_tokens"
    if requested is None and body.max_tokens is not None:
        requested, param = body.max_tokens, "max_tokens"
    max_len = state.config.model.max_model_len
    try:
        token_ids = engine.input_processor.encode(prompt, False, max_len - 1)
    except PromptTooLongError as error:
        raise admission.prompt_too_long(error.num_tokens, max_len, "messages") from None
    except Exception as error:
        raise bad_request(f"could not tokenise the messages: {error}", "messages") from None
    max_tokens = admission.resolve_max_tokens(requested, len(token_ids), max_len, param, "messages")
    num_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = admission.sampling_params(
        body, max_tokens, num_logprobs, {"max_tokens": param, "logprobs": "top_logprobs"}
    )
    request_id = admission.new_request_id("chatcmpl")
    return admission.process(engine, request_id, token_ids, params, "messages", prompt)


def _logprobs(
    state: ServerState, body: ChatCompletionRequest, token_ids: list[int], positions
) -> ChoiceLogprobs | None:
    if not body.logprobs or positions is None:
        return None
    k = body.top_logprobs or 0
    return ChoiceLogprobs(content=chat_logprobs(state.engine.tokenizer, token_ids, positions, k))


def _choice(state: ServerState, body: ChatCompletionRequest, c: CompletionOutput) -> ChatChoice:
    return ChatChoice(
        index=c.index,
        message=ChatMessageOut(content=c.text),
        logprobs=_logprobs(state, body, c.token_ids, c.logprobs),
        finish_reason=c.finish_reason,
        stop_reason=c.stop_reason,
    )


def _response(
    state: ServerState, body: ChatCompletionRequest, output: RequestOutput
) -> ChatCompletionResponse:
    return ChatCompletionResponse(
        id=output.request_id,
        model=body.model,
        choices=[_choice(state, body, c) for c in output.outputs],
        usage=admission.usage_of([output]),
    )


async def _stream(
    state: ServerState, body: ChatCompletionRequest, request_id: str, streams: list[RequestStream]
) -> AsyncIterator[str]:
    def chunk(choices: list[ChatChunkChoice], usage=None) -> str:
        return admission.sse(
            ChatCompletionChunk(id=request_id, model=body.model, choices=choices, usage=usage)
        )

    yield chunk(
        [
            ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
            for i in range(body.n)
        ]
    )
    cursors = StreamCursors()
    final: RequestOutput | None = None
    try:
        async for _, output in engine_calls.merged(streams):
            choices = []
            for c in output.outputs:
                delta = cursors.advance(c.index, c)
                if delta is None:
                    continue
                positions: list[PositionLogprobs] | None = delta.logprobs
                choices.append(
                    ChatChunkChoice(
                        index=c.index,
                        delta=DeltaMessage(content=delta.text or None),
                        logprobs=_logprobs(state, body, delta.token_ids, positions),
                        finish_reason=delta.finish_reason,
                    )
                )
            if choices:
                yield chunk(choices)
            if output.finished:
                final = output
    except engine_calls.STREAM_ERRORS as error:
        yield engine_calls.stream_error(error)
    else:
        if body.include_usage and final is not None:
            yield chunk([], usage=admission.usage_of([final]))
    yield "data: [DONE]\n\n"
