"""``X-Request-Id``: every HTTP response carries one, the client's own when it sent a usable
one (at most :data:`MAX_REQUEST_ID_CHARS` characters of letters, digits and ``-_.:``), else
one made here; the id is also the context of every log line written while the request is
handled (``request_id=...``, see :class:`RequestIdLogFilter`).

Plain ASGI, outermost: answers given before the app runs (401, 413, CORS preflights) carry
the id too.
"""

from __future__ import annotations

import contextvars
import logging
import re
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "X-Request-Id"
MAX_REQUEST_ID_CHARS = 128
_USABLE = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_REQUEST_ID_CHARS}}}")

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def current_request_id() -> str | None:
    """The id of the HTTP request being handled in this context (None outside one)."""
    return _current.get()


def usable_request_id(value: str | None) -> str:
    """``value`` when it is a usable id, else a new random one."""
    if value is not None and _USABLE.fullmatch(value):
        return value
    return uuid.uuid4().hex


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = usable_request_id(Headers(scope=scope).get(HEADER))
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        token = _current.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _current.reset(token)


class RequestIdLogFilter(logging.Filter):
    """Adds ``request_id`` to the fields of records written while a request is handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = _current.get()
        if request_id is not None:
            fields = getattr(record, "fields", None) or {}
            if "request_id" not in fields:
                record.fields = {**fields, "request_id": request_id}
        return True
