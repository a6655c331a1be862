"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the right
status. Every failure a client can cause maps to 400, 401, 404 or 503 here; a 500 means a bug
in the server and is logged with its traceback."""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from metroline.engine.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

#: Seconds a client should wait before retrying a 503.
RETRY_AFTER_S = 1


class OpenAIError(Exception):
    """An error to answer with an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or _default_type(status)
        self.headers = headers

    def response(self) -> JSONResponse:
        body = ErrorResponse(
            error=ErrorInfo(
                message=self.message, type=self.error_type, param=self.param, code=self.code
            )
        )
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)


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


def _validation_param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    # Pydantic names union members (e.g. "str", "list[int]"); drop them from the path.
    parts = [p for p in parts if not any(c in p for c in "[]") and p not in ("str", "int")]
    return ".".join(parts) or None


async def _on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    errors = error.errors()
    first = errors[0] if errors else {"msg": "invalid request", "loc": (), "type": ""}
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return bad_request(f"the request body is not valid JSON: {detail}".strip()).response()
    param = _validation_param(tuple(first.get("loc", ())))
    message = str(first.get("msg", "invalid value"))
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
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
