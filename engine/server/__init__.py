"""Metroline's OpenAI-compatible HTTP server (FastAPI), run by ``metroline serve``.

:func:`build_app` makes the application; :func:`serve` runs it under uvicorn with drain on
SIGTERM. The engine core runs in a separate process (see
:mod:`metroline.engine.client.async_llm`). Both load on first use, so reading the server's
settings (:class:`ServerArgs`, for the command line) loads neither FastAPI nor uvicorn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy_exports import lazy_exports

if TYPE_CHECKING:
    from .app import build_app
    from .args import ServerArgs
    from .uvicorn_server import serve

_PUBLIC = {"build_app": ".app", "ServerArgs": ".args", "serve": ".uvicorn_server"}

__all__ = ["ServerArgs", "build_app", "serve"]

__getattr__ = lazy_exports(__name__, _PUBLIC)
