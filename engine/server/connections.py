"""Connection-level limits of ``metroline serve``: a header timeout, a cap on open
connections, and logs that stay bounded when clients misbehave in bulk.

uvicorn's h11 protocol only times out idle keep-alive connections between requests; a
connection that never sends a request, or trickles its headers (slowloris), would stay open
for ever, and nothing bounds how many are open, so a client holding idle sockets could use up
the file-descriptor limit (then ``accept()`` fails with EMFILE and probes go unanswered).
:class:`GuardedH11Protocol` adds both bounds; its own log lines go through a
:class:`~metroline.engine.server.log_floods.RepeatLimiter`, so that misbehaving clients in
bulk cannot flood the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import RETRY_AFTER_S
from .log_floods import RepeatLimiter

logger = logging.getLogger(__name__)

#: Descriptors the API-server process keeps for itself. At rest it holds about 15 (stdio, the
#: listening socket, the selector and the loop's self-pipe, the engine core's pipes and death
#: pipe); the rest is headroom for files opened while serving (tokenizer and template files,
#: ``/proc`` reads, log files, more pipes with tensor parallelism).
PROCESS_FD_RESERVE = 64
#: Connections asyncio accepts per wake-up of the listening socket (what it calls
#: ``backlog``). Each holds a descriptor one loop iteration before
#: :meth:`GuardedH11Protocol.connection_made` counts it, and a connection closed to make room
#: frees its descriptor one iteration after: a burst can hold about three batches of
#: descriptors above the cap.
ACCEPT_BATCH = 64
#: The kernel's queue of connections not yet accepted (``listen()``), set apart from
#: :data:`ACCEPT_BATCH` so that a burst of clients waits in it instead of retrying its SYN.
LISTEN_BACKLOG = 2048
#: Seconds a connection closed with unread input (answered 503 at the cap, or answered
#: before its body was read: 401, 413, 415) stays open to read and drop what the client
#: sends, so that closing it does not reset the connection before the client read the answer.
LINGER_S = 1.0
#: Connections lingering at once at most; beyond, they are closed at once.
MAX_LINGERING = 32
#: Connections above the cap, when every other one is busy, that may still get probes
#: (``/health``, ``/ready``, ``/metrics``; anything else is answered 503): a cap full of busy
#: connections cannot lock the kubelet out.
PROBE_SLOTS = 16
PROBE_PATHS = frozenset({"/health", "/ready", "/metrics"})
#: The whole reserve: the cap is the soft ``RLIMIT_NOFILE`` minus this (304).
FD_RESERVE = PROCESS_FD_RESERVE + 3 * ACCEPT_BATCH + MAX_LINGERING + PROBE_SLOTS


def fd_soft_limit() -> int | None:
    """The soft ``RLIMIT_NOFILE`` of this process; ``None`` when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def connection_cap(max_connections: int, fd_limit: int | None) -> int:
    """``max_connections`` lowered to what ``fd_limit`` leaves after :data:`FD_RESERVE`
    (at least 1, so that probes get through even under an absurdly low limit)."""
    if fd_limit is None:
        return max_connections
    return max(1, min(max_connections, fd_limit - FD_RESERVE))


def log_connection_cap(cap: int, max_connections: int, fd_limit: int | None) -> None:
    """One line at start; a warning when the file-descriptor limit lowered the cap."""
    if cap < max_connections:
        logger.warning(
            "accepting at most %d connections: the file-descriptor limit %s leaves no more "
            "after a reserve of %d (--max-connections %d); raise `ulimit -n` to allow more",
            cap, fd_limit, FD_RESERVE, max_connections,
        )  # fmt: skip
    else:
        logger.info("accepting at most %d connections (--max-connections)", cap)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What every connection of one server obeys."""

    #: Live connections at most (see :class:`ConnectionRegistry`).
    cap: int
    #: Seconds a connection has to deliver a complete request head; 0: no limit.
    header_timeout: float


class ConnectionRegistry:
    """The open connections of one server, and which of them are idle.

    Invariant: once :meth:`GuardedH11Protocol.connection_made` has returned, at most ``cap``
    connections are live (open, and not being closed or rejected by the server). ``idle``
    holds the live connections with no request in progress in the order they became idle,
    so its first entry is the longest idle.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.live: set[GuardedH11Protocol] = set()
        self.idle: dict[GuardedH11Protocol, None] = {}
        #: Closed connections still open to read what their client sent.
        self.lingering = 0
        #: Connections above the cap that serve probes only.
        self.probe_slots = 0

    def add(self, connection: GuardedH11Protocol) -> None:
        """A new connection: live, and idle since now."""
        self.live.add(connection)
        self.idle[connection] = None

    def set_idle(self, connection: GuardedH11Protocol, idle: bool) -> None:
        """Idle since now if it just became idle; a connection staying idle keeps its place."""
        if not idle:
            self.idle.pop(connection, None)
        elif connection in self.live and connection not in self.idle:
            self.idle[connection] = None

    def remove(self, connection: GuardedH11Protocol) -> None:
        self.live.discard(connection)
        self.idle.pop(connection, None)

    def over_cap(self) -> bool:
        return len(self.live) > self.cap

    def longest_idle(self, other_than: GuardedH11Protocol) -> GuardedH11Protocol | None:
        for connection in self.idle:
            if connection is not other_than:
                return connection
        return None


def _canned_503() -> bytes:
    error = {
        "message": "the server has as many connections open as it allows, all of them busy; "
        "retry shortly",
        "type": "service_unavailable",
        "param": None,
        "code": "too_many_connections",
    }
    body = json.dumps({"error": error}).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        f"retry-after: {RETRY_AFTER_S}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


#: The whole answer to a connection that arrives when every connection is busy.
TOO_MANY_CONNECTIONS = _canned_503()


def _probes_only(app: Any) -> Any:
    """``app`` for probe paths; anything else on a probe slot gets the 503 of the cap."""
    head, _, body = TOO_MANY_CONNECTIONS.partition(b"\r\n\r\n")
    headers = [tuple(line.split(b": ", 1)) for line in head.split(b"\r\n")[1:]]

    async def guarded(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in PROBE_PATHS:
            await app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return guarded


class _LingeringTransport:
    """The connection's transport, whose ``close`` lingers when the client is still sending
    a request body nobody will read (the app answered early): it half-closes, drops what
    arrives for :data:`LINGER_S`, then closes. Everything else passes through."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedH11Protocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._closing = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        unread_body = self._protocol.conn.their_state is h11.SEND_BODY
        if not (unread_body and self._protocol.linger()):
            self._transport.close()


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout and a connection cap.

    A connection is *idle* while no request is in progress on it: before its first request
    head is complete, and from the end of a response to the next complete head. The header
    timer runs from the connection's start for the first request, and from the first byte
    of each later one (before that byte, uvicorn's keep-alive timer governs); it stops once
    the head is complete, and closes the connection if it fires first. A connection that
    arrives above the cap closes the longest-idle other one; if none is idle, the newcomer is
    answered :data:`TOO_MANY_CONNECTIONS` and closed.

    uvicorn makes one instance per connection from a class: :func:`protocol_class` binds a
    subclass to one server's limits, registry and log limiter.
    """

    limits: ClassVar[ConnectionLimits]
    registry: ClassVar[ConnectionRegistry]
    repeats: ClassVar[RepeatLimiter]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        #: Input is read and dropped (rejected or lingering): closing must not reset.
        self._dropping_input = False
        self._lingering = False
        self._probe_slot = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw_transport = transport
        super().connection_made(_LingeringTransport(transport, self))  # type: ignore[arg-type]
        self.registry.add(self)
        if self.registry.over_cap() and not self._make_room():
            if self.registry.probe_slots >= PROBE_SLOTS:
                self._reject()
                return
            self.registry.remove(self)  # counted apart, as a probe slot
            self.registry.probe_slots += 1
            self._probe_slot = True
            self.app = _probes_only(self.app)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._dropping_input:
            return
        super().data_received(data)
        self._track_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._track_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        if self._lingering:
            self._lingering = False
            self.registry.lingering -= 1
        if self._probe_slot:
            self._probe_slot = False
            self.registry.probe_slots -= 1
        self.registry.remove(self)
        super().connection_lost(exc)

    def close_idle(self) -> None:
        """Close this connection, which has no request in progress."""
        self.registry.remove(self)
        self._cancel_header_timer()
        if self.transport.is_closing():
            return
        # h11 may already be past the point of a clean close: closing the socket is enough.
        with contextlib.suppress(h11.LocalProtocolError):
            self.conn.send(h11.ConnectionClosed())
        self.transport.close()

    def _request_in_progress(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _track_request(self) -> None:
        """Re-derive idleness and the header timer from h11's and the request cycle's state."""
        if self.transport.is_closing():
            self.registry.remove(self)
            self._cancel_header_timer()
            return
        in_progress = self._request_in_progress()
        self.registry.set_idle(self, not in_progress)
        if in_progress or self.conn.their_state is not h11.IDLE:
            self._cancel_header_timer()  # the head is complete
        elif self.cycle is not None and self.conn.trailing_data[0]:
            self._arm_header_timer()  # the first bytes of a later request

    def _arm_header_timer(self) -> None:
        if self._header_timer is None and self.limits.header_timeout > 0:
            timeout = self.limits.header_timeout
            self._header_timer = self.loop.call_later(timeout, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self._request_in_progress():
            return
        if self.conn.their_state is h11.IDLE:
            self._log(logging.INFO, "closed a connection that sent no complete request head "
                      "within %s s (--header-timeout)", self.limits.header_timeout)  # fmt: skip
            self.close_idle()

    def _make_room(self) -> bool:
        """Close the longest-idle other connection; False if every other one is busy."""
        victim = self.registry.longest_idle(other_than=self)
        if victim is None:
            return False
        victim.close_idle()
        self._log(logging.WARNING, "%d connections open (the cap): closed the longest-idle one",
                  self.registry.cap)  # fmt: skip
        return True

    def _reject(self) -> None:
        """Answer 503 and close; linger a little first, reading, unless too many do."""
        self.registry.remove(self)
        self._log(logging.WARNING, "%d connections open (the cap), all busy: answered a new "
                  "one 503", self.registry.cap)  # fmt: skip
        self.transport.write(TOO_MANY_CONNECTIONS)
        if not self.linger():
            self.transport.close()

    def linger(self) -> bool:
        """Half-close, drop input for :data:`LINGER_S`, then close; False (and nothing done)
        when too many connections linger already."""
        raw = self._raw_transport
        if self.registry.lingering >= MAX_LINGERING or not raw.can_write_eof():
            return False
        self.registry.remove(self)
        self._cancel_header_timer()
        self._dropping_input = True
        self._lingering = True
        self.registry.lingering += 1
        raw.write_eof()
        raw.resume_reading()  # uvicorn paused it when the unread body filled its buffer
        self.loop.call_later(LINGER_S, raw.close)
        return True

    def _log(self, level: int, message: str, *args: object) -> None:
        text = message % args
        if self.repeats.admit(text):
            logger.log(level, text)


def protocol_class(limits: ConnectionLimits, repeats: RepeatLimiter) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` subclass for one server (uvicorn's ``Config(http=...)``)."""
    attributes = {"limits": limits, "registry": ConnectionRegistry(limits.cap), "repeats": repeats}
    return type("GuardedH11Protocol", (GuardedH11Protocol,), attributes)
