"""Runs the app under uvicorn, with SIGTERM meaning "drain" instead of "stop now".

uvicorn's own SIGTERM handling stops listening at once (new clients would get connection
refused) and re-raises the signal after shutdown (exit status 143). Here the first SIGTERM
only starts the drain: the server keeps answering (probes, 503 for new work) until in-flight
requests finish, then asks uvicorn to stop, and the process exits 0. SIGINT (Ctrl-C) keeps
uvicorn's behaviour.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

import uvicorn

from metroline.engine.config import EngineConfig
from metroline.engine.server.app import build_app
from metroline.engine.server.args import ServerArgs

logger = logging.getLogger(__name__)

#: Seconds uvicorn waits for connections after the app has drained.
_GRACEFUL_SHUTDOWN_S = 5


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.exit_code = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.app_state = None

    async def startup(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def request_exit(self, code: int) -> None:
        """Called on the event loop by the app: stop serving and exit with ``code``."""
        self.exit_code = max(self.exit_code, code)
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self.app_state is not None and self.loop is not None:
            if not self.should_exit:
                self.loop.call_soon_threadsafe(self.app_state.begin_drain)
            return
        super().handle_exit(sig, frame)


def serve(config: EngineConfig, args: ServerArgs) -> int:
    """Serve until drained or stopped; returns the process exit status."""
    holder: dict[str, DrainingServer] = {}
    app = build_app(config, args, request_exit=lambda code: holder["server"].request_exit(code))
    uvicorn_config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=args.access_log,
        timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
        timeout_keep_alive=5,
    )
    server = DrainingServer(uvicorn_config)
    server.app_state = app.state.server
    holder["server"] = server
    server.run()
    if server.exit_code == 0 and not server.started:
        return 1  # could not bind the port, or the lifespan failed
    return server.exit_code
