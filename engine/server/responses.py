"""OpenAPI descriptions of the error responses every route may give."""

from __future__ import annotations

from typing import Any

from .protocol import ErrorResponse

_ERROR = {"model": ErrorResponse}
#: One server-sent event of a stream (OpenAPI 3.1 describes ``text/event-stream`` per event).
_SSE_EVENT = {
    "type": "object",
    "properties": {
        "data": {
            "type": "string",
            "description": "A chunk of the response (JSON), an error body ending a failed "
            'stream (`{"error": {...}}`), or `[DONE]`.',
        }
    },
    "required": ["data"],
}

GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/event-stream": {"schema": _SSE_EVENT}},
        "description": "JSON, or server-sent events ending in `data: [DONE]` when streaming.",
    },
    400: {**_ERROR, "description": "Malformed request or out-of-range parameter."},
    401: {**_ERROR, "description": "Missing or wrong API key."},
    404: {**_ERROR, "description": "Unknown model."},
    408: {**_ERROR, "description": "The body did not arrive within --body-timeout."},
    413: {**_ERROR, "description": "The body is larger than --max-request-bytes."},
    415: {**_ERROR, "description": "The body is not JSON."},
    503: {**_ERROR, "description": "Loading, draining or overloaded; see Retry-After."},
}

AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {**_ERROR, "description": "Missing or wrong API key."},
}
