"""The FastAPI application: routers per area, OpenAI error bodies, a gate on ``/v1/*`` and
vLLM's root API routes (API key, content type, body limits:
:mod:`~metroline.engine.server.gate`), an in-flight counter that also refuses new work while
draining, CORS when ``--allowed-origins`` is given (no CORS headers otherwise), an
``X-Request-Id`` on every response, and a lifespan that loads the model in the background
(probes answer while it loads) and stops the engine core at exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.middleware.cors import CORSMiddleware

from ..config import EngineConfig
from .args import ServerArgs
from .auth import SECURITY_SCHEME
from .errors import install_error_handlers, unavailable
from .gate import RequestGate, is_api_path
from .request_ids import HEADER as REQUEST_ID_HEADER
from .request_ids import RequestIdMiddleware
from .routers import chat, completions, health, models, tokenize
from .state import ServerState

logger = logging.getLogger(__name__)


class ClientNotReading(Exception):
    """A response waited ``send_timeout`` seconds for a client that read nothing."""


class InFlightMiddleware:
    """Counts API requests (``/v1/*`` and the root API routes) from arrival until their
    last byte is sent (streams included); while draining, answers new ones 503 with
    ``Retry-After`` at once. A response that cannot send for ``send_timeout`` seconds (the
    client reads nothing, so uvicorn's write buffer stays full) is dropped: the app's send
    raises, which ends a stream and aborts its requests, and the connection is closed."""

    def __init__(self, app, state: ServerState) -> None:
        self.app = app
        self.state = state
        self.send_timeout = state.args.send_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not is_api_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        if self.state.readiness.draining:
            response = unavailable(
                "the server is shutting down; retry on another replica", "draining"
            )
            await response.response()(scope, receive, send)
            return
        timeout = self.send_timeout

        async def send_or_give_up(message) -> None:
            try:
                async with asyncio.timeout(timeout):
                    await send(message)
            except TimeoutError:
                raise ClientNotReading() from None

        self.state.in_flight += 1
        try:
            await self.app(scope, receive, send_or_give_up)
        except ClientNotReading:
            logger.warning(
                "dropped a response: its client read nothing for %g s (--send-timeout)", timeout
            )
        finally:
            self.state.in_flight -= 1


def build_app(
    config: EngineConfig, args: ServerArgs, request_exit: Callable[[int], None] | None = None
) -> FastAPI:
    """``request_exit(code)`` is how the app asks its HTTP server to stop (drain done: 0,
    engine core dead: 1)."""
    state = ServerState(config, args, request_exit)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        try:
            yield
        finally:
            await state.shutdown()

    app = FastAPI(
        title="Metroline",
        summary="OpenAI-compatible LLM serving",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(InFlightMiddleware, state=state)
    app.add_middleware(RequestGate, args=args)
    if args.allowed_origins:  # before the gate: a preflight carries no API key
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(args.allowed_origins),
            allow_methods=list(args.allowed_methods),
            allow_headers=list(args.allowed_headers),
            allow_credentials=args.allow_credentials,
            expose_headers=[REQUEST_ID_HEADER],
        )
    app.add_middleware(RequestIdMiddleware)  # added last: runs first
    app.include_router(health.router, tags=["probes"])
    app.include_router(models.router, tags=["openai"])
    app.include_router(completions.router, tags=["openai"])
    app.include_router(chat.router, tags=["openai"])
    app.include_router(tokenize.router, tags=["vllm"])
    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, minus its 422 responses: validation errors are 400s here."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, summary=app.summary, routes=app.routes
        )
        api_key = app.state.server.args.api_key
        for route, path in schema.get("paths", {}).items():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
                if api_key and is_api_path(route):
                    operation["security"] = [{"bearer": []}]
        if api_key:
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": SECURITY_SCHEME}
        components = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        # Document the served names; other names are a 404 (not a validation error).
        names = list(app.state.server.args.served_model_names)
        for name in ("CompletionRequest", "ChatCompletionRequest"):
            model = components.get(name, {}).get("properties", {}).get("model")
            if model is not None:
                model["enum"] = names
                model["description"] = "One of the served model names: " + ", ".join(names)
        app.openapi_schema = schema
    return app.openapi_schema
