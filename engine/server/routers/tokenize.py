"""``POST /tokenize`` and ``POST /detokenize``, as vLLM serves them (at the root, not under
``/v1``; ``vllm bench serve`` uses them to fit its prompts to the server's tokenizer), guarded
as ``/v1/*`` is: the API key, the content type and the body limits
(:func:`~metroline.engine.server.gate.is_api_path`).

Bounded: a prompt (or rendered conversation) may have at most max_model_len tokens, as may
a detokenize request, and every id must be below the model's vocabulary size. Tokenising,
rendering templates and decoding run off the event loop (:func:`admission.prepare`).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ...client.async_llm import AsyncLLM
from ...client.input_processor import PromptTooLongError
from .. import admission
from ..errors import bad_request
from ..json_body import StrictJSONRoute
from ..protocol_tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from ..responses import GENERATION_RESPONSES
from ..state import ServerState
from .chat import check_contents, render_prompt

router = APIRouter(route_class=StrictJSONRoute)

#: The errors these routes may answer (those of the generation routes).
_RESPONSES = {status: info for status, info in GENERATION_RESPONSES.items() if status != 200}


def _admit(state: ServerState, body: TokenizeRequest | DetokenizeRequest) -> AsyncLLM:
    admission.check_unknown_fields(state, body)
    engine = admission.admit(state, body.model or state.args.model_name)
    if engine.tokenizer is None:
        raise bad_request("this model has no tokenizer files: it cannot (de)tokenise text")
    return engine


@router.post(
    "/tokenize",
    response_model=TokenizeResponse,
    responses=_RESPONSES,
    summary="Tokenise a prompt or a conversation (vLLM's endpoint)",
)
async def tokenize(body: TokenizeRequest, raw_request: Request, state: admission.StateDep):
    engine = _admit(state, body)
    chat = isinstance(body, TokenizeChatRequest)
    if chat and body.chat_template is not None and not state.args.trust_request_chat_template:
        raise bad_request(
            "a chat_template in the request needs the server started with "
            "--trust-request-chat-template (the template runs on the server)",
            param="chat_template",
        )
    if chat:
        check_contents(body.messages)
    try:
        response = await admission.prepare(state, raw_request, _tokenize, state, engine, body)
    except admission.ClientGone:
        return Response(status_code=499)
    return await state.off_loop(lambda: JSONResponse(response.model_dump()), respond=True)


def _tokenize(state: ServerState, engine: AsyncLLM, body: TokenizeRequest) -> TokenizeResponse:
    """On a worker thread: this grows with the input."""
    max_len = state.config.model.max_model_len
    if isinstance(body, TokenizeCompletionRequest):
        text, param = body.prompt, "prompt"
    else:
        text, param = render_prompt(state, engine, body), "messages"
    try:
        tokens = engine.input_processor.encode(text, body.add_special_tokens, max_len)
    except PromptTooLongError as error:
        raise bad_request(
            f"the {param} has {error.num_tokens} tokens; this server tokenises at most "
            f"max_model_len={max_len}",
            param=param,
            code="context_length_exceeded",
        ) from None
    except Exception as error:  # a tokenizer may refuse any text
        raise bad_request(f"could not tokenise the {param}: {error}", param=param) from None
    tokens = list(tokens)
    strings = engine.tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
    return TokenizeResponse(
        count=len(tokens), max_model_len=max_len, tokens=tokens, token_strs=strings
    )


@router.post(
    "/detokenize",
    response_model=DetokenizeResponse,
    responses=_RESPONSES,
    summary="Turn token ids into text (vLLM's endpoint)",
)
async def detokenize(body: DetokenizeRequest, raw_request: Request, state: admission.StateDep):
    engine = _admit(state, body)
    try:
        text = await admission.prepare(state, raw_request, _detokenize, state, engine, body.tokens)
    except admission.ClientGone:
        return Response(status_code=499)
    return DetokenizeResponse(prompt=text)


def _detokenize(state: ServerState, engine: AsyncLLM, tokens: list[int]) -> str:
    """On a worker thread (this grows with the input); special tokens are kept, as vLLM
    keeps them."""
    max_len = state.config.model.max_model_len
    if len(tokens) > max_len:
        raise bad_request(
            f"tokens has {len(tokens)} ids; at most max_model_len={max_len} allowed",
            param="tokens",
        )
    vocab_size = state.config.model.arch.vocab_size
    for index, token in enumerate(tokens):
        if token >= vocab_size:
            raise bad_request(
                f"tokens.{index}: {token} is not a token id (the vocabulary has {vocab_size})",
                param=f"tokens.{index}",
            )
    try:
        return engine.tokenizer.decode(tokens)
    except Exception as error:  # a tokenizer may refuse any ids
        raise bad_request(f"could not detokenise the tokens: {error}", param="tokens") from None
