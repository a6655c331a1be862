"""Bearer-token auth for ``/v1/*`` (probes and metrics stay open)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from metroline.engine.server.errors import OpenAIError

#: Declares the scheme in the OpenAPI schema; the check itself is ours (OpenAI error body).
bearer = HTTPBearer(auto_error=False, description="The server's --api-key")


async def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> None:
    """``Authorization: Bearer <key>`` must match the configured key (compared in constant
    time); otherwise a 401 in OpenAI's shape. Only installed when a key is configured."""
    expected = request.app.state.server.args.api_key
    token = credentials.credentials if credentials is not None else ""
    if (
        credentials is None
        or credentials.scheme.lower() != "bearer"
        or not hmac.compare_digest(token.encode(), expected.encode())
    ):
        raise OpenAIError(
            401,
            "missing or incorrect API key: send 'Authorization: Bearer <key>'",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
