"""``POST /v1/completions``: one engine request per prompt, ``n`` choices each; choice
``i`` of prompt ``p`` has index ``p * n + i``."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from metroline.engine.async_llm import AsyncLLM, RequestStream
from metroline.engine.input_processor import ProcessedPrompt
from metroline.engine.outputs import RequestOutput
from metroline.engine.server import runs, serving
from metroline.engine.server.errors import bad_request
from metroline.engine.server.json_body import StrictJSONRoute
from metroline.engine.server.logprobs import completion_logprobs
from metroline.engine.server.protocol import PromptTokensDetails, UsageInfo
from metroline.engine.server.protocol_completions import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
)
from metroline.engine.server.responses import GENERATION_RESPONSES
from metroline.engine.server.state import ServerState
from metroline.engine.server.streaming import StreamCursors

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
    state: serving.StateDep,
) -> Response:
    engine = serving.admit(state, body.model)
    serving.reject_unsupported(body)
    if body.echo:
        raise bad_request("echo is not supported", param="echo")
    if body.suffix:
        raise bad_request("suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request("best_of must equal n (or be left out)", param="best_of")
    prompts = _prompts(body.prompt)
    serving.check_sequences(state, len(prompts), body.n)
    request_id = serving.new_request_id("cmpl")
    try:
        processed = await serving.prepare(
            state, raw_request, _process, state, engine, body, request_id, prompts
        )
    except serving.ClientGone:
        return Response(status_code=499)
    if body.stream:
        return StreamingResponse(
            _stream(state, body, request_id, runs.start(engine, processed, stream=True)),
            media_type="text/event-stream",
        )
    try:
        outputs = await runs.final_outputs(runs.start(engine, processed, False), raw_request)
    except serving.ClientGone:
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
    processed = []
    for index, prompt in enumerate(prompts):
        token_ids = serving.tokenize(engine, prompt, "prompt")
        max_tokens = serving.resolve_max_tokens(
            body.max_tokens, len(token_ids), max_len, "max_tokens", "prompt"
        )
        params = serving.sampling_params(body, max_tokens, body.logprobs, {})
        text = prompt if isinstance(prompt, str) else None
        engine_id = request_id if len(prompts) == 1 else f"{request_id}-{index}"
        processed.append(serving.process(engine, engine_id, token_ids, params, "prompt", text))
    return processed


def _response(
    state: ServerState, body: CompletionRequest, request_id: str, outputs: list[RequestOutput]
) -> CompletionResponse:
    tokenizer = state.engine.tokenizer
    choices = []
    for p, output in enumerate(outputs):
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
                )
            )
    return CompletionResponse(
        id=request_id, model=body.model, choices=choices, usage=serving.usage_of(outputs)
    )


async def _stream(
    state: ServerState, body: CompletionRequest, request_id: str, streams: list[RequestStream]
) -> AsyncIterator[str]:
    tokenizer = state.engine.tokenizer
    cursors = StreamCursors()
    usage = UsageInfo(prompt_tokens_details=PromptTokensDetails())
    try:
        async for p, output in runs.merged(streams):
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
                done = serving.usage_of([output])
                usage.prompt_tokens += done.prompt_tokens
                usage.completion_tokens += done.completion_tokens
                cached = done.prompt_tokens_details.cached_tokens
                usage.prompt_tokens_details.cached_tokens += cached
            if choices:
                yield serving.sse(
                    CompletionResponse(id=request_id, model=body.model, choices=choices)
                )
    except runs.STREAM_ERRORS as error:
        yield runs.stream_error(error)
    else:
        if body.include_usage:
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
            yield serving.sse(
                CompletionResponse(id=request_id, model=body.model, choices=[], usage=usage)
            )
    yield "data: [DONE]\n\n"
