"""The first thing every ``/v1/*`` request meets, as plain ASGI (before FastAPI reads a byte
of the body): the API key from the headers, the content type, and the body's size and time
limits.

Invariants:

- a request without the right key is answered 401 from its headers alone; its body is never
  read, and the connection is closed after the answer (so the rest of the body is not read
  either);
- no request body larger than ``max_request_bytes`` is ever held: a declared
  ``Content-Length`` over the limit is answered 413 at once, a chunked body is counted as it
  arrives and answered 413 once it passes the limit;
- a body not received whole within ``body_timeout`` seconds of the request head is answered
  408;
- a body with a non-JSON ``Content-Type`` is answered 415; one without a ``Content-Type`` is
  read as JSON.

Answers given here carry ``Connection: close``: the unread rest of a body must not be taken
as the next request. Limits found while FastAPI reads the body are raised from ``receive``
as :class:`OpenAIError` (an HTTP exception, which FastAPI passes through unchanged).
"""

from __future__ import annotations

import asyncio
import email.message

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..sampling_params import shorten
from .args import ServerArgs
from .auth import api_key_matches, missing_api_key
from .errors import OpenAIError

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
#: API routes outside ``/v1/`` (vLLM serves them at the root), guarded as ``/v1/*`` is.
ROOT_API_PATHS = frozenset({"/tokenize", "/detokenize"})
_CLOSE = {"Connection": "close"}


def body_too_large(limit: int) -> OpenAIError:
    return OpenAIError(
        413,
        f"the request body is larger than this server's limit of {limit} bytes "
        "(--max-request-bytes)",
        code="request_too_large",
        headers=dict(_CLOSE),
    )


def body_too_slow(timeout: float) -> OpenAIError:
    return OpenAIError(
        408,
        f"the request body did not arrive within {timeout:g} s (--body-timeout)",
        code="request_timeout",
        headers=dict(_CLOSE),
    )


def is_api_path(path: str) -> bool:
    """``/v1/*`` and :data:`ROOT_API_PATHS`: the routes the gate guards."""
    return path.startswith("/v1/") or path in ROOT_API_PATHS


class RequestGate:
    """ASGI middleware for ``/v1/*`` (and :data:`ROOT_API_PATHS`); see the module
    docstring."""

    def __init__(self, app: ASGIApp, args: ServerArgs) -> None:
        self.app = app
        self.api_key = args.api_key
        self.max_request_bytes = args.max_request_bytes
        self.body_timeout = args.body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_api_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if self.api_key is not None and not api_key_matches(
            headers.get("authorization"), self.api_key
        ):
            await _answer(missing_api_key(), scope, receive, send)
            return
        if scope["method"] in _BODY_METHODS:
            content_type = headers.get("content-type")
            if content_type is None:
                scope = _with_json_content_type(scope)
            elif not _is_json(content_type):
                await _answer(_unsupported_media_type(content_type), scope, receive, send)
                return
            declared = _content_length(headers)
            if declared is not None and declared > self.max_request_bytes:
                await _answer(body_too_large(self.max_request_bytes), scope, receive, send)
                return
            receive = LimitedBody(receive, self.max_request_bytes, self.body_timeout)
        await self.app(scope, receive, send)


class LimitedBody:
    """A ``receive`` that counts body bytes against ``limit`` and stops waiting for the body
    ``timeout`` seconds after it was made. Once the body is complete it passes messages
    (the disconnect a handler may wait for) through untouched."""

    def __init__(self, receive: Receive, limit: int, timeout: float) -> None:
        self.receive = receive
        self.limit = limit
        self.timeout = timeout
        self.deadline = asyncio.get_running_loop().time() + timeout
        self.received = 0
        self.complete = False

    async def __call__(self) -> Message:
        if self.complete:
            return await self.receive()
        try:
            async with asyncio.timeout_at(self.deadline):
                message = await self.receive()
        except TimeoutError:
            raise body_too_slow(self.timeout) from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                raise body_too_large(self.limit)
            self.complete = not message.get("more_body", False)
        return message


def _is_json(content_type: str) -> bool:
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


def _with_json_content_type(scope: Scope) -> Scope:
    return {**scope, "headers": [*scope["headers"], (b"content-type", b"application/json")]}


def _content_length(headers: Headers) -> int | None:
    value = headers.get("content-length")
    if value is None or not value.isdigit():
        return None  # h11 has already refused a malformed one
    return int(value)


def _unsupported_media_type(content_type: str) -> OpenAIError:
    return OpenAIError(
        415,
        "the request body must be JSON (Content-Type: application/json), not "
        f"{shorten(content_type, 100)!r}",
        code="unsupported_media_type",
    )


async def _answer(error: OpenAIError, scope: Scope, receive: Receive, send: Send) -> None:
    error.headers = {**(error.headers or {}), **_CLOSE}
    await error.response()(scope, receive, send)
