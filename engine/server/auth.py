"""Bearer-token auth for ``/v1/*`` (probes and metrics stay open)."""

from __future__ import annotations

import hmac

from fastapi import Request

from metroline.engine.server.errors import OpenAIError


async def require_api_key(request: Request) -> None:
    """With an API key configured, ``Authorization: Bearer <key>`` must match it (compared
    in constant time); otherwise a 401 in OpenAI's shape."""
    expected = request.app.state.server.args.api_key
    if not expected:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), expected.encode()
    ):
        raise OpenAIError(
            401,
            "missing or incorrect API key: send 'Authorization: Bearer <key>'",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
