"""Runs the app under uvicorn, with SIGTERM meaning "drain" instead of "stop now".

uvicorn's own SIGTERM handling stops listening at once (new clients would get connection
refused) and re-raises the signal after shutdown (exit status 143). Here the first SIGTERM
only starts the drain: the server keeps answering (probes, 503 for new work) until in-flight
requests finish, then asks uvicorn to stop, and the process exits 0. SIGINT (Ctrl-C) keeps
uvicorn's behaviour.

Connections are guarded by :mod:`~metroline.engine.server.connections` (header timeout, a cap
fitted to the file-descriptor limit), and errors that can repeat in a flood (asyncio's accept
loop, uvicorn's per-connection warnings) are logged through one :class:`RepeatLimiter`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from asyncio.trsock import TransportSocket
from types import FrameType

import uvicorn

from ..config import EngineConfig
from .app import build_app
from .args import ServerArgs
from .connections import (
    ACCEPT_BATCH,
    LISTEN_BACKLOG,
    ConnectionLimits,
    connection_cap,
    fd_soft_limit,
    log_connection_cap,
    protocol_class,
)
from .log_floods import LoopErrorHandler, RepeatFilter, RepeatLimiter, report_repeats

logger = logging.getLogger(__name__)

#: Seconds uvicorn waits for connections after the app has drained.
_GRACEFUL_SHUTDOWN_S = 5


def _set_listen_backlog(sock: socket.socket | TransportSocket, backlog: int) -> None:
    """asyncio gives ``listen()`` the same number as its accept batch: lengthen the kernel's
    queue afterwards (on a duplicate descriptor of the same socket; Linux updates the queue
    of a listening socket in place)."""
    with sock.dup() as duplicate:
        duplicate.listen(backlog)


#: Loggers whose warnings can come once per connection (so in floods).
_FLOODING_LOGGERS = ("uvicorn.error",)


class DrainingServer(uvicorn.Server):
    def __init__(
        self, config: uvicorn.Config, repeats: RepeatLimiter, engine: EngineConfig
    ) -> None:
        super().__init__(config)
        self.exit_code = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.app_state = None
        self.repeats = repeats
        self.engine = engine

    async def startup(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop.set_exception_handler(LoopErrorHandler(self.repeats))
        await super().startup(sockets=sockets)
        for listener in getattr(self, "servers", ()):
            for sock in listener.sockets:
                _set_listen_backlog(sock, LISTEN_BACKLOG)
        self._log_serving()

    def _log_serving(self) -> None:
        """Once the socket is bound (so the line never announces a port that failed)."""
        listeners = [sock for server in getattr(self, "servers", ()) for sock in server.sockets]
        if not listeners or self.app_state is None:
            return
        host, port = listeners[0].getsockname()[:2]
        logger.info(
            "serving %s as %s on http://%s:%d",
            self.engine.model.path,
            ", ".join(self.app_state.args.served_model_names),
            f"[{host}]" if ":" in host else host,
            port,
            extra={
                "fields": {
                    "device": str(self.engine.device),
                    "max_model_len": self.engine.model.max_model_len,
                }
            },
        )

    async def on_tick(self, counter: int) -> bool:
        """uvicorn calls this every 0.1 s; once a second, report errors counted, not logged."""
        if counter % 10 == 0:
            self.repeats.flush()
        return await super().on_tick(counter)

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
    repeats = RepeatLimiter(report_repeats)
    fd_limit = fd_soft_limit()
    cap = connection_cap(args.max_connections, fd_limit)
    log_connection_cap(cap, args.max_connections, fd_limit)
    uvicorn_config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        http=protocol_class(ConnectionLimits(cap, args.header_timeout), repeats),
        ws="none",  # no WebSocket routes; an upgrade would also leave the connection cap
        backlog=ACCEPT_BATCH,
        log_config=None,
        access_log=args.access_log,
        timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
        timeout_keep_alive=args.keep_alive_timeout,
    )
    server = DrainingServer(uvicorn_config, repeats, config)
    server.app_state = app.state.server
    holder["server"] = server
    repeat_filter = RepeatFilter(repeats)
    for name in _FLOODING_LOGGERS:
        logging.getLogger(name).addFilter(repeat_filter)
    try:
        server.run()
    finally:
        repeats.flush(everything=True)
        for name in _FLOODING_LOGGERS:
            logging.getLogger(name).removeFilter(repeat_filter)
    if server.exit_code == 0 and not server.started:
        return 1  # could not bind the port, or the lifespan failed
    return server.exit_code
