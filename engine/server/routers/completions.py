"""``POST /v1/completions``: one engine request per prompt, ``n`` choices each; choice
``i`` of prompt ``p`` has index ``p * n + i``."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ...client.async_llm import AsyncLLM, RequestStream
from ...client.input_processor import ProcessedPrompt
from ...outputs import RequestOutput
from .. import admission, engine_calls
from ..errors import bad_request
from ..json_body import StrictJSONRoute
from ..logprobs import completion_logprobs, prompt_logprobs
from ..protocol import PromptTokensDetails, UsageInfo
from ..protocol_completions import CompletionChoice, CompletionRequest, CompletionResponse
from ..responses import GENERATION_RESPONSES
from ..state import ServerState
from ..streaming import StreamCursors
from ..structured_request import structured_outputs_of

router = APIRouter(route_class=StrictJSONRoute)


def _prompts(prompt: str | list) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses=GENERATION_RESPONSES,
    summary="Create a completion (OpenAI legacy completions API)",
)
async def create_completion(
    body: CompletionRequest,
    raw_request: Request,
    state: admission.StateDep,
) -> Response:
    admission.check_unknown_fields(state, body)
    engine = admission.admit(state, body.model)
    admission.reject_unsupported(body)
    if body.echo:
        raise bad_request("echo is not supported", param="echo")
    if body.suffix:
        raise bad_request("suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request("best_of must equal n (or be left out)", param="best_of")
    prompts = _prompts(body.prompt)
    admission.check_sequences(state, len(prompts), body.n)
    request_id = admission.new_request_id("cmpl")
    try:
        processed = await admission.prepare(
            state, raw_request, _process, state, engine, body, request_id, prompts
        )
    except admission.ClientGone:
        return Response(status_code=499)
    if body.stream:
        return StreamingResponse(
            _stream(state, body, request_id, engine_calls.start(engine, processed, stream=True)),
            media_type="text/event-stream",
        )
    try:
        streams = engine_calls.start(engine, processed, False)
        outputs = await engine_calls.final_outputs(streams, raw_request)
    except admission.ClientGone:
        return Response(status_code=499)
    return await state.off_loop(
        lambda: JSONResponse(_response(state, body, request_id, outputs).model_dump()),
        respond=True,
    )


def _process(
    state: ServerState,
    engine: AsyncLLM,
    body: CompletionRequest,
    request_id: str,
    prompts: list[str | list[int]],
) -> list[ProcessedPrompt]:
    """Tokenise and validate every prompt (a worker thread: this grows with the input)."""
    max_len = state.config.model.max_model_len
    keep = admission.truncation(body, max_len)
    structured = structured_outputs_of(body)
    processed = []
    for index, prompt in enumerate(prompts):
        token_ids = admission.tokenize(engine, prompt, "prompt", keep)
        defaults = state.config.model.generation_defaults
        max_tokens = admission.resolve_max_tokens(
            body.max_tokens, len(token_ids), max_len, "max_tokens", "prompt", defaults
        )
        params = admission.sampling_params(
            body, max_tokens, body.logprobs, {}, defaults, structured
        )
        text = prompt if isinstance(prompt, str) else None
        engine_id = request_id if len(prompts) == 1 else f"{request_id}-{index}"
        processed.append(
            admission.process(engine, engine_id, token_ids, params, "prompt", text, structured)
        )
    return processed


def _response(
    state: ServerState, body: CompletionRequest, request_id: str, outputs: list[RequestOutput]
) -> CompletionResponse:
    tokenizer = state.engine.tokenizer
    choices = []
    for p, output in enumerate(outputs):
        prompt = None
        if body.prompt_logprobs is not None and output.prompt_logprobs is not None:
            prompt = prompt_logprobs(tokenizer, output.prompt_logprobs)
        for c in output.outputs:
            logprobs = None
            if body.logprobs is not None and c.logprobs is not None:
                logprobs = completion_logprobs(tokenizer, c.token_ids, c.logprobs, body.logprobs)
            choices.append(
                CompletionChoice(
                    index=p * body.n + c.index,
                    text=c.text,
                    logprobs=logprobs,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                    prompt_logprobs=prompt,
                )
            )
    return CompletionResponse(
        id=request_id, model=body.model, choices=choices, usage=admission.usage_of(outputs)
    )


async def _stream(
    state: ServerState, body: CompletionRequest, request_id: str, streams: list[RequestStream]
) -> AsyncIterator[str]:
    """Server-sent chunks of every prompt's choices, then the usage (with
    ``include_usage``; in every chunk as well with ``continuous_usage_stats``: the tokens
    of every prompt so far)."""
    tokenizer = state.engine.tokenizer
    cursors = StreamCursors()
    usage = UsageInfo(prompt_tokens_details=PromptTokensDetails())
    latest: dict[int, RequestOutput] = {}
    try:
        async for p, output in engine_calls.merged(streams):
            latest[p] = output
            choices = []
            for c in output.outputs:
                index = p * body.n + c.index
                delta = cursors.advance(index, c)
                if delta is None:
                    continue
                logprobs = None
                if body.logprobs is not None and delta.logprobs is not None:
                    logprobs = completion_logprobs(
                        tokenizer, delta.token_ids, delta.logprobs, body.logprobs, delta.text_offset
                    )
                choices.append(
                    CompletionChoice(
                        index=index,
                        text=delta.text,
                        logprobs=logprobs,
                        finish_reason=delta.finish_reason,
                        stop_reason=delta.stop_reason,
                    )
                )
            if output.finished:
                done = admission.usage_of([output])
                usage.prompt_tokens += done.prompt_tokens
                usage.completion_tokens += done.completion_tokens
                cached = done.prompt_tokens_details.cached_tokens
                usage.prompt_tokens_details.cached_tokens += cached
            if choices:
                so_far = (
                    admission.usage_of(list(latest.values())) if body.continuous_usage else None
                )
                yield admission.sse(
                    CompletionResponse(
                        id=request_id, model=body.model, choices=choices, usage=so_far
                    )
                )
    except engine_calls.STREAM_ERRORS as error:
        yield engine_calls.stream_error(error)
    else:
        if body.include_usage:
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
            yield admission.sse(
                CompletionResponse(id=request_id, model=body.model, choices=[], usage=usage)
            )
    yield "data: [DONE]\n\n"
