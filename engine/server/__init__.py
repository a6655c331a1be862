"""Metroline's OpenAI-compatible HTTP server (FastAPI), run by ``metroline serve``.

:func:`build_app` makes the application; :func:`serve` runs it under uvicorn with drain on
SIGTERM. The engine core runs in a separate process (see :mod:`metroline.engine.async_llm`).
"""

from metroline.engine.server.app import build_app
from metroline.engine.server.args import ServerArgs
from metroline.engine.server.runner import serve

__all__ = ["ServerArgs", "build_app", "serve"]
