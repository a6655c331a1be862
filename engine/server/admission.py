"""What both generation endpoints do before running a request: admit it (404 / 503), turn
its fields into sampling parameters and a validated engine request (400 naming the
parameter), and the shapes shared by responses (usage, server-sent events). Running the
request is in :mod:`metroline.engine.server.engine_calls`."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel

from ..client.async_llm import AsyncLLM
from ..client.input_processor import ProcessedPrompt, PromptTooLongError
from ..generation_defaults import default_max_tokens, request_sampling_fields
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams, shorten
from .errors import OpenAIError, bad_request, unavailable
from .protocol import PromptTokensDetails, SamplingFields, UsageInfo, unknown_fields
from .request_ids import current_request_id
from .state import ServerState
from .structured_request import StructuredOutput

logger = logging.getLogger(__name__)
T = TypeVar("T")
#: Unknown field names one 400 lists, and names logged once each under
#: --allow-unknown-fields (further new names are not logged: the log stays bounded).
_UNKNOWN_NAMED = 8
_UNKNOWN_LOGGED_MAX = 256
_unknown_logged: set[str] = set()
_FIELD = re.compile(r"^(\w+)")
_SAMPLING_FIELDS = set(SamplingParams.__dataclass_fields__)


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


async def wait_for_disconnect(request: Request) -> None:
    """Return once the client has gone (the body must have been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def get_state(request: Request) -> ServerState:
    return request.app.state.server


#: Route parameter type for the server state (``state: StateDep``).
StateDep = Annotated[ServerState, Depends(get_state)]


def new_request_id(prefix: str) -> str:
    """The engine's id for a request: ``prefix``, the HTTP request's ``X-Request-Id`` (the
    client's when it sent a usable one, see :mod:`.request_ids`), and a short random
    suffix, so that two requests sent with the same header never share an engine id."""
    base = current_request_id() or uuid.uuid4().hex
    return f"{prefix}-{base}-{secrets.token_hex(6)}"


def admit(state: ServerState, model: str) -> AsyncLLM:
    """The engine, if this request may go to it now; else the right 404 or 503."""
    if model not in state.args.served_model_names:
        raise OpenAIError(
            404,
            f"the model {shorten(model, 100)!r} does not exist; this server serves "
            + ", ".join(repr(n) for n in state.args.served_model_names),
            param="model",
            code="model_not_found",
        )
    readiness = state.readiness
    if readiness.dead_reason is not None:
        raise unavailable(f"the engine is not available: {readiness.dead_reason}", "engine_dead")
    if readiness.draining:
        raise unavailable("the server is shutting down; retry on another replica", "draining")
    if not readiness.loaded or state.engine is None:
        raise unavailable("the model is still loading; retry shortly", "loading")
    limit = state.args.max_waiting_requests
    waiting = state.engine.num_unscheduled + state.num_preparing
    if limit is not None and waiting >= limit:
        raise unavailable(
            f"the server is overloaded: {waiting} requests are waiting (limit {limit}); "
            "retry shortly",
            "overloaded",
        )
    return state.engine


async def prepare(
    state: ServerState, request: Request, function: Callable[..., T], *args: object
) -> T:
    """Run a request's preparation (tokenising, validating) off the event loop.

    Meanwhile the request counts as waiting, for load shedding, and its body against
    --max-preparing-bytes (503 when it would pass it, unless nothing else is being prepared);
    a client that disconnects first gets its preparation cancelled if it has not started
    (:class:`ClientGone`). The caller adds the result to the engine before its next
    ``await``, so the request is never uncounted in between."""
    size = len(await request.body())
    limit = state.args.max_preparing_bytes
    if state.num_preparing and state.preparing_bytes + size > limit:
        raise unavailable(
            f"the server is overloaded: {state.preparing_bytes} bytes of requests are being "
            f"prepared (limit {limit}, --max-preparing-bytes); retry shortly",
            "overloaded",
        )
    state.num_preparing += 1
    state.preparing_bytes += size
    work = asyncio.ensure_future(state.off_loop(function, *args))
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        state.num_preparing -= 1
        state.preparing_bytes -= size
    if not work.done():
        work.cancel()
        raise ClientGone()
    if state.closing:
        raise unavailable("the server is shutting down; retry on another replica", "draining")
    return work.result()


def check_sequences(state: ServerState, num_prompts: int, n: int) -> None:
    """400 unless the request's prompts times ``n`` fit --max-sequences-per-request."""
    limit = state.args.max_sequences_per_request
    if num_prompts * n > limit:
        raise bad_request(
            f"this request asks for {num_prompts * n} sequences ({num_prompts} prompts x n={n}); "
            f"this server allows at most {limit} per request (--max-sequences-per-request)",
            param="n" if num_prompts == 1 else "prompt",
        )


def check_unknown_fields(state: ServerState, body: SamplingFields) -> None:
    """400 naming the request's unknown fields (``param``: the first one's dotted path);
    with --allow-unknown-fields, log each name once and go on."""
    if state.args.allow_unknown_fields:
        for name in itertools.islice(unknown_fields(body), _UNKNOWN_NAMED):
            name = shorten(name, 100)
            if name not in _unknown_logged and len(_unknown_logged) < _UNKNOWN_LOGGED_MAX:
                _unknown_logged.add(name)
                logger.warning(
                    "ignoring the unknown request field %r (--allow-unknown-fields)", name
                )
        return
    names = [shorten(n, 100) for n in itertools.islice(unknown_fields(body), _UNKNOWN_NAMED + 1)]
    if names:
        listed = ", ".join(repr(n) for n in names[:_UNKNOWN_NAMED])
        more = " and more" if len(names) > _UNKNOWN_NAMED else ""
        raise bad_request(
            f"unrecognized request field{'s' if len(names) > 1 else ''} {listed}{more}: this "
            "server does not implement them (start it with --allow-unknown-fields to ignore "
            "unknown fields instead)",
            param=names[0],
            code="unknown_field",
        )


def reject_unsupported(body: SamplingFields) -> None:
    """400 for fields this server takes but not in this combination."""
    if body.stream_options is not None and not body.stream:
        raise bad_request(
            "stream_options is only allowed when stream is true", param="stream_options"
        )
    if body.stream_options is not None and (
        body.stream_options.continuous_usage_stats and not body.stream_options.include_usage
    ):
        raise bad_request(
            "stream_options.continuous_usage_stats needs stream_options.include_usage true",
            param="stream_options.continuous_usage_stats",
        )
    if body.stream and body.prompt_logprobs is not None:
        raise bad_request(
            "prompt_logprobs are not available when streaming (stream: true)",
            param="prompt_logprobs",
        )


def truncation(body: SamplingFields, max_model_len: int) -> int | None:
    """How many prompt tokens ``truncate_prompt_tokens`` keeps (None: all); -1 means
    max_model_len, as in vLLM."""
    keep = body.truncate_prompt_tokens
    if keep == -1:
        return max_model_len
    if keep is not None and not 1 <= keep <= max_model_len:
        raise bad_request(
            f"truncate_prompt_tokens must be -1 or in [1, {max_model_len}] (max_model_len); "
            f"got {keep}",
            param="truncate_prompt_tokens",
        )
    return keep


def keep_last(token_ids: list[int], keep: int, head: Sequence[int] = ()) -> list[int]:
    """The last ``keep`` of ``token_ids``; when they start with ``head`` (the special
    tokens the tokenizer puts first, e.g. BOS), ``head`` stays and counts toward ``keep``,
    as a tokenizer truncating on the left does."""
    if len(token_ids) <= keep:
        return token_ids
    head = list(head)
    if head and len(head) < keep and token_ids[: len(head)] == head:
        return head + token_ids[len(token_ids) - (keep - len(head)) :]
    return token_ids[len(token_ids) - keep :]


def prompt_too_long(prompt_len: int, max_model_len: int, prompt_param: str) -> OpenAIError:
    """400 ``context_length_exceeded``: the prompt leaves no room for a generated token."""
    return bad_request(
        f"this model's maximum context length is {max_model_len} tokens, but the prompt "
        f"has {prompt_len} tokens: the prompt plus at least one generated token must fit",
        param=prompt_param,
        code="context_length_exceeded",
    )


def resolve_max_tokens(
    requested: int | None,
    prompt_len: int,
    max_model_len: int,
    param: str,
    prompt_param: str,
    defaults: Mapping[str, Any] | None = None,
) -> int:
    """Tokens the request may generate (unset: what fits, capped by the model's default
    from ``defaults``); 400 when the prompt and ``requested`` (the field ``param``) do not
    fit."""
    room = max_model_len - prompt_len
    if room < 1:
        raise prompt_too_long(prompt_len, max_model_len, prompt_param)
    if requested is None:
        return default_max_tokens(defaults or {}, room)
    if requested > room:
        raise bad_request(
            f"this model's maximum context length is {max_model_len} tokens, but you asked "
            f"for {prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} "
            f"for the completion); lower {param} to at most {room}",
            param=param,
            code="context_length_exceeded",
        )
    return requested


def sampling_params(
    body: SamplingFields,
    max_tokens: int,
    logprobs: int | None,
    aliases: dict[str, str],
    defaults: Mapping[str, Any] | None = None,
    structured: StructuredOutput | None = None,
) -> SamplingParams:
    """``aliases`` maps engine field names to the request's (e.g. max_tokens); fields the
    request leaves unset take the model's ``defaults`` (see generation_defaults);
    ``structured`` is the request's :func:`.structured_request.structured_outputs_of`."""
    fields = {
        "n": body.n,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "presence_penalty": body.presence_penalty or 0.0,
        "frequency_penalty": body.frequency_penalty or 0.0,
        "repetition_penalty": body.repetition_penalty,
        "seed": body.seed,
        "stop": body.stop,
        "stop_token_ids": body.stop_token_ids,
        "max_tokens": max_tokens,
        "min_tokens": body.min_tokens,
        "ignore_eos": body.ignore_eos,
        "logprobs": logprobs,
        "prompt_logprobs": body.prompt_logprobs,
        "skip_special_tokens": body.skip_special_tokens,
        "include_stop_str_in_output": body.include_stop_str_in_output,
        "logit_bias": body.logit_bias,
        "allowed_token_ids": body.allowed_token_ids,
        "bad_words": body.bad_words,
        "structured_outputs": structured.params if structured is not None else None,
    }
    try:
        return SamplingParams(**request_sampling_fields(fields, defaults or {}))
    except ValueError as error:
        raise bad_request(str(error), param=_param_of(str(error), aliases)) from None


def process(
    engine: AsyncLLM,
    request_id: str,
    token_ids: list[int],
    params: SamplingParams,
    prompt_param: str,
    prompt_text: str | None = None,
    structured: StructuredOutput | None = None,
) -> ProcessedPrompt:
    try:
        processed = engine.input_processor.process(request_id, token_ids, params, time.monotonic())
    except ValueError as error:  # about the prompt, unless it names a sampling field
        param = _param_of(str(error), {}) or prompt_param
        if structured is not None and "structured output" in str(error).lower():
            param = structured.param  # e.g. a schema keyword the grammar compiler lacks
        raise bad_request(str(error), param=param) from None
    processed.prompt = prompt_text
    return processed


def tokenize(
    engine: AsyncLLM, prompt: str | list[int], param: str, keep: int | None = None
) -> list[int]:
    """The prompt's token ids, only the last ``keep`` of them when given (see
    :func:`keep_last`)."""
    max_len = engine.config.model.max_model_len
    try:
        if keep is None:
            return engine.input_processor.tokenize(prompt)[1]
        if not isinstance(prompt, str):
            return keep_last(list(prompt), keep)
        if engine.input_processor.encode is None:
            raise ValueError("this model has no tokenizer files: give prompts as token id lists")
        encode = engine.input_processor.encode
        return keep_last(encode(prompt, True), keep, encode("", True))
    except PromptTooLongError as error:
        raise prompt_too_long(error.num_tokens, max_len, param) from None
    except ValueError as error:
        raise bad_request(str(error), param=param) from None


def _param_of(message: str, aliases: dict[str, str]) -> str | None:
    match = _FIELD.match(message)
    if match is None or match.group(1) not in _SAMPLING_FIELDS:
        return None
    return aliases.get(match.group(1), match.group(1))


def usage_of(outputs: Sequence[RequestOutput]) -> UsageInfo:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outputs)
    return UsageInfo(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


def sse(payload: BaseModel | dict | str) -> str:
    """One server-sent event."""
    if isinstance(payload, BaseModel):
        payload = payload.model_dump_json()
    elif isinstance(payload, dict):
        payload = json.dumps(payload)
    return f"data: {payload}\n\n"
