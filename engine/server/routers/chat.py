"""``POST /v1/chat/completions``: a chat template (the request's, --chat-template's or the
tokenizer's: :mod:`metroline.engine.chat_templates`) turns ``messages`` into one prompt;
``n`` choices come from one engine request. With ``echo``, each answer starts with the last
message's content when that message is the assistant's (as vLLM does). Tool calls (tools,
tool_choice, parallel_tool_calls, calls in the history): :mod:`..tool_calls` and its
siblings."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ...chat_templates import ChatTemplateError, check_template_text, load_chat_template
from ...chat_templates import render_chat as render_conversation
from ...client.async_llm import AsyncLLM, RequestStream
from ...client.input_processor import ProcessedPrompt, PromptTooLongError
from ...outputs import CompletionOutput, PositionLogprobs, RequestOutput
from .. import admission, engine_calls
from ..errors import bad_request
from ..json_body import StrictJSONRoute
from ..logprobs import chat_logprobs, prompt_logprobs
from ..protocol_chat import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatMessageOut,
    ChoiceLogprobs,
    DeltaMessage,
)
from ..responses import GENERATION_RESPONSES
from ..state import ServerState
from ..streaming import StreamCursors
from ..structured_request import structured_outputs_of, structured_sources
from ..tool_calls import ToolPlan, adjust_sampling, plan_tools
from ..tool_calls_history import check_history
from ..tool_calls_response import ToolCallStreams, answer_of
from ..tool_calls_schema import check_exclusive, forced_output

router = APIRouter(route_class=StrictJSONRoute)


def render_prompt(
    state: ServerState, engine: AsyncLLM, body: ChatCompletionRequest, tools: ToolPlan | None = None
) -> str:
    """The prompt text (with the request's tools): 400 naming the field at fault when it
    cannot be rendered."""
    template = body.chat_template
    if template is not None:
        try:
            check_template_text(template, "chat_template")
        except ValueError as error:
            raise bad_request(str(error), param="chat_template") from None
    elif state.args.chat_template is not None:
        template = load_chat_template(state.args.chat_template)
    try:
        return render_conversation(
            engine.tokenizer,
            [m.for_template(i) for i, m in enumerate(body.messages)],
            chat_template=template,
            chat_template_kwargs=body.chat_template_kwargs,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            tools=tools.tools if tools is not None else None,
        )
    except ChatTemplateError as error:
        raise bad_request(str(error), param=error.param) from None


def _check(state: ServerState, body: ChatCompletionRequest) -> ToolPlan | None:
    """400 for what cannot be served; the request's tool plan."""
    admission.reject_unsupported(body)
    tools = plan_tools(body, state.args)
    check_exclusive(tools, structured_sources(body))
    if body.top_logprobs and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs")
    if body.chat_template is not None and not state.args.trust_request_chat_template:
        raise bad_request(
            "a chat_template in the request needs the server started with "
            "--trust-request-chat-template (the template runs on the server)",
            param="chat_template",
        )
    check_contents(body.messages)
    return tools


def check_contents(messages: list[ChatMessage]) -> None:
    """400 for a message without content, unless it is the assistant's (as OpenAI allows),
    and for tool fields on the wrong role."""
    check_history(messages)
    for index, message in enumerate(messages):
        if message.content is None and message.role != "assistant":
            raise bad_request(
                f"a {message.role} message needs content (only an assistant's may be null)",
                param=f"messages.{index}.content",
            )


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
    admission.check_unknown_fields(state, body)
    engine = admission.admit(state, body.model)
    tools = _check(state, body)
    admission.check_sequences(state, 1, body.n)
    try:
        processed = await admission.prepare(
            state, raw_request, _process, state, engine, body, tools
        )
    except admission.ClientGone:
        return Response(status_code=499)
    if body.stream:
        streams = engine_calls.start(engine, [processed], stream=True)
        return StreamingResponse(
            _stream(state, body, processed, streams, tools),
            media_type="text/event-stream",
        )
    try:
        streams = engine_calls.start(engine, [processed], False)
        (output,) = await engine_calls.final_outputs(streams, raw_request)
    except admission.ClientGone:
        return Response(status_code=499)
    return await state.off_loop(
        lambda: JSONResponse(_response(state, body, output, tools).model_dump()), respond=True
    )


def _process(
    state: ServerState, engine: AsyncLLM, body: ChatCompletionRequest, tools: ToolPlan | None
) -> ProcessedPrompt:
    """Render the template, tokenise and validate (a worker thread: this grows with the
    input)."""
    structured = structured_outputs_of(body)
    structured = forced_output(tools) or structured  # _check refused both at once
    prompt = render_prompt(state, engine, body, tools)
    requested, param = body.max_completion_tokens, "max_completion_tokens"
    if requested is None and body.max_tokens is not None:
        requested, param = body.max_tokens, "max_tokens"
    max_len = state.config.model.max_model_len
    keep = admission.truncation(body, max_len)
    try:
        if keep is None:
            token_ids = engine.input_processor.encode(prompt, False, max_len - 1)
        else:
            token_ids = admission.keep_last(engine.input_processor.encode(prompt, False), keep)
    except PromptTooLongError as error:
        raise admission.prompt_too_long(error.num_tokens, max_len, "messages") from None
    except Exception as error:
        raise bad_request(f"could not tokenise the messages: {error}", "messages") from None
    defaults = state.config.model.generation_defaults
    max_tokens = admission.resolve_max_tokens(
        requested, len(token_ids), max_len, param, "messages", defaults
    )
    num_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    aliases = {"max_tokens": param, "logprobs": "top_logprobs"}
    params = admission.sampling_params(
        body, max_tokens, num_logprobs, aliases, defaults, structured
    )
    adjust_sampling(tools, body, params)
    request_id = admission.new_request_id("chatcmpl")
    return admission.process(engine, request_id, token_ids, params, "messages", prompt, structured)


def _echo(body: ChatCompletionRequest) -> str:
    """What each answer starts with: the last message's content, with ``echo`` and when
    that message is the assistant's (the role answers take)."""
    last = body.messages[-1]
    return last.text() if body.echo and last.role == "assistant" else ""


def _logprobs(
    state: ServerState, body: ChatCompletionRequest, token_ids: list[int], positions
) -> ChoiceLogprobs | None:
    if not body.logprobs or positions is None:
        return None
    k = body.top_logprobs or 0
    return ChoiceLogprobs(content=chat_logprobs(state.engine.tokenizer, token_ids, positions, k))


def _choice(
    state: ServerState,
    body: ChatCompletionRequest,
    c: CompletionOutput,
    echo: str,
    tools: ToolPlan | None,
) -> ChatChoice:
    answer = answer_of(tools, c.text, c.finish_reason)
    content = echo + answer.content if answer.content is not None else (echo or None)
    return ChatChoice(
        index=c.index,
        message=ChatMessageOut(content=content, tool_calls=answer.tool_calls),
        logprobs=_logprobs(state, body, c.token_ids, c.logprobs),
        finish_reason=answer.finish_reason,
        stop_reason=c.stop_reason,
    )


def _response(
    state: ServerState, body: ChatCompletionRequest, output: RequestOutput, tools: ToolPlan | None
) -> ChatCompletionResponse:
    echo = _echo(body)
    prompt = None
    if body.prompt_logprobs is not None and output.prompt_logprobs is not None:
        prompt = prompt_logprobs(state.engine.tokenizer, output.prompt_logprobs)
    return ChatCompletionResponse(
        id=output.request_id,
        model=body.model,
        choices=[_choice(state, body, c, echo, tools) for c in output.outputs],
        usage=admission.usage_of([output]),
        prompt_logprobs=prompt,
    )


async def _stream(
    state: ServerState,
    body: ChatCompletionRequest,
    processed: ProcessedPrompt,
    streams: list[RequestStream],
    tools: ToolPlan | None,
) -> AsyncIterator[str]:
    """Server-sent chunks: the role, the echo (if any), the deltas (content and tool calls),
    then the usage (with ``include_usage``; in every chunk as well with
    ``continuous_usage_stats``)."""
    latest: RequestOutput | None = None
    prompt_usage = admission.usage_of([])
    prompt_usage.prompt_tokens = prompt_usage.total_tokens = len(processed.prompt_token_ids)

    def chunk(choices: list[ChatChunkChoice], usage=None) -> str:
        if usage is None and body.continuous_usage:
            usage = prompt_usage if latest is None else admission.usage_of([latest])
        return admission.sse(
            ChatCompletionChunk(
                id=processed.request_id, model=body.model, choices=choices, usage=usage
            )
        )

    def first(content: str) -> list[ChatChunkChoice]:
        return [
            ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=content))
            for i in range(body.n)
        ]

    yield chunk(first(""))
    echo = _echo(body)
    if echo:
        yield chunk(
            [ChatChunkChoice(index=i, delta=DeltaMessage(content=echo)) for i in range(body.n)]
        )
    cursors, tool_streams = StreamCursors(), ToolCallStreams(tools)
    try:
        async for _, output in engine_calls.merged(streams):
            latest = output
            choices = []
            for c in output.outputs:
                delta = cursors.advance(c.index, c)
                if delta is None:
                    continue
                positions: list[PositionLogprobs] | None = delta.logprobs
                text, calls, finish_reason = tool_streams.step(
                    c.index, delta.text, delta.finish_reason
                )
                choices.append(
                    ChatChunkChoice(
                        index=c.index,
                        delta=DeltaMessage(content=text or None, tool_calls=calls or None),
                        logprobs=_logprobs(state, body, delta.token_ids, positions),
                        finish_reason=finish_reason,
                    )
                )
            if choices:
                yield chunk(choices)
    except engine_calls.STREAM_ERRORS as error:
        yield engine_calls.stream_error(error)
    else:
        if body.include_usage and latest is not None and latest.finished:
            yield chunk([], usage=admission.usage_of([latest]))
    yield "data: [DONE]\n\n"
