"""Bearer-token auth for ``/v1/*`` (probes and metrics stay open), checked from the headers
alone by :class:`~metroline.engine.server.gate.RequestGate`, before any byte of the body is
read: a client without the key costs the server nothing but its headers."""

from __future__ import annotations

import hmac

from .errors import OpenAIError

#: The OpenAPI security scheme the schema declares for ``/v1/*`` when a key is set.
SECURITY_SCHEME = {"type": "http", "scheme": "bearer", "description": "The server's --api-key"}


def api_key_matches(authorization: str | None, expected: str) -> bool:
    """``Authorization: Bearer <key>`` carries ``expected`` (compared in constant time)."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), expected.encode())


def missing_api_key() -> OpenAIError:
    return OpenAIError(
        401,
        "missing or incorrect API key: send 'Authorization: Bearer <key>'",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )
