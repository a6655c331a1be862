"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the right
status. Every failure a client can cause maps to 400, 401, 404 or 503 here; a 500 means a bug
in the server and is logged with its traceback."""

from __future__ import annotations

import logging
import re
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

#: Seconds a client should wait before retrying a 503.
RETRY_AFTER_S = 1


class OpenAIError(StarletteHTTPException):
    """An error to answer with an OpenAI error body. An HTTP exception, so that one raised
    while FastAPI reads the body (by the body limits) reaches its handler unchanged."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or _default_type(status)
        self.headers = headers

    def body(self) -> dict:
        info = ErrorInfo(
            message=self.message, type=self.error_type, param=self.param, code=self.code
        )
        return ErrorResponse(error=info).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def unavailable(message: str, code: str) -> OpenAIError:
    """503 with ``Retry-After``: overloaded, draining, loading, or the engine is gone."""
    return OpenAIError(503, message, code=code, headers={"Retry-After": str(RETRY_AFTER_S)})


def _default_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 503:
        return "service_unavailable"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}
_IDENTIFIER = re.compile(r"^[A-Za-z_]\w*$")


def _validation_param(loc: tuple) -> str | None:
    """``("body", "prompt", "constrained-str")`` -> ``"prompt"``: drop the body marker and
    pydantic's names for union members, keep field names and list indices."""
    parts = [
        str(p)
        for p in loc
        if isinstance(p, int) or (_IDENTIFIER.match(str(p)) and p not in _TYPE_NAMES | {"body"})
    ]
    return ".".join(parts) or None


async def _on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    errors = error.errors() or [{"msg": "invalid request", "loc": (), "type": ""}]
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return bad_request(f"the request body is not valid JSON: {detail}".strip()).response()
    param = _validation_param(tuple(first.get("loc", ())))
    # A union reports one error per member: show them together, as alternatives.
    messages: list[str] = []
    for entry in errors:
        if _validation_param(tuple(entry.get("loc", ()))) == param:
            message = str(entry.get("msg", "invalid value"))
            if message not in messages:
                messages.append(message)
    message = "; or ".join(messages)
    if param:
        message = f"{param}: {message}"
    return bad_request(message, param=param).response()


async def _on_openai_error(request: Request, error: OpenAIError) -> JSONResponse:
    return error.response()


async def _on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    try:
        phrase = HTTPStatus(error.status_code).phrase
    except ValueError:
        phrase = "error"
    message = error.detail if isinstance(error.detail, str) else phrase
    return OpenAIError(error.status_code, message, headers=error.headers).response()


async def _on_unexpected(request: Request, error: Exception) -> JSONResponse:
    logger.exception("internal error on %s %s", request.method, request.url.path)
    return OpenAIError(500, f"internal server error: {type(error).__name__}").response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(OpenAIError, _on_openai_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
