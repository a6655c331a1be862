"""The activator: an HTTP proxy in the operator process that holds requests while an
LLMDeployment scaled to zero wakes up.

After a scale to zero the engine Service keeps its name, port and selector; the operator adds
an EndpointSlice of that Service whose one endpoint is this server on the leader's pod
(``render.render_activator_slice``), so kube-proxy sends the Service's traffic here. Each
request is:

1. not a health probe: ``PROBE_PATHS`` are answered 503 with ``Retry-After`` and wake
   nothing (a kubelet or load balancer probing the Service must not keep it awake);
2. matched to its LLMDeployment by ``Directory.find``, from the ``Host`` header only (the
   Service's DNS names; 404 otherwise): nothing in the body chooses the target;
3. bounded before its body is read: its slot and its bytes (``Content-Length``, or
   ``max_body`` when chunked) are reserved first, so at most ``max_held`` requests and
   ``max_held_bytes`` of bodies are ever held, at most ``max_reading`` of them still reading
   (503 with ``Retry-After`` beyond), a body over ``max_body`` is a 413 and one not sent
   within ``read_timeout_s`` a 408; the reservation is released on every exit;
4. reported (``Directory.demand``: the autoscaler wakes a deployment at zero; ``holding`` says
   it still waits, which the autoscaler counts as activity);
5. held until a ready engine pod exists (``Directory.addresses``, polled every ``poll_s``) for
   at most ``Directory.hold_s`` (``spec.autoscaling.activationTimeoutSeconds``), then proxied
   to one (round robin), its answer streamed back as it comes; or answered 503 with
   ``Retry-After`` when the hold ends first, 502 when the pod does not answer. A client that
   disconnects while held is dropped at once (its handler is cancelled): never proxied.

Every answer carries ``Connection: close``, so no client keeps a connection to the activator
once the Service's endpoints are the engine pods again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
from typing import Any, Protocol

import aiohttp
import aiohttp.web
from multidict import CIMultiDict, CIMultiDictProxy

from . import constants as c
from .cache import Key
from .kvmetrics import read_bounded

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 2**20
"""The engine's own default ``--max-request-bytes``."""
MAX_HELD = 256
MAX_HELD_BYTES = 64 * 2**20
"""Bodies held at once, in all: the operator's memory limit is 512 MiB."""
MAX_READING = 64
"""Requests still sending their body, at once (each holds a reservation meanwhile)."""
READ_TIMEOUT_S = 30.0
"""A body not received within this is a 408 (no slow sender holds a slot for long)."""
UPSTREAM_READ_TIMEOUT_S = 600.0
"""Longest silence of an engine pod's answer before the proxy gives up on it."""
RETRY_AFTER_S = 30
POLL_S = 0.25
PROBE_PATHS = frozenset({"/health", "/ready", "/metrics", "/version"})
"""Answered 503 without waking: probes are not demand."""
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
"""Headers of one connection (RFC 9110 7.6.1), and those the proxy sets itself."""


class Directory(Protocol):
    """What the activator asks of the operator (``scaler.Scaler`` answers)."""

    def find(self, host: str) -> Key | None: ...
    def demand(self, key: Key) -> None: ...
    def addresses(self, key: Key) -> list[str]: ...
    def hold_s(self, key: Key) -> float: ...


def _error(status: int, message: str, code: str, retry: bool = False) -> aiohttp.web.Response:
    kind = "service_unavailable" if status == 503 else "invalid_request_error"
    headers = {"Retry-After": str(RETRY_AFTER_S)} if retry else None
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    response = aiohttp.web.json_response(body, status=status, headers=headers)
    response.force_close()
    return response


def end_to_end(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    """``headers`` without those of one connection: ``HOP_BY_HOP`` and those ``Connection``
    names; repeated headers are kept, each as sent."""
    named = {t.strip().lower() for v in headers.getall("Connection", ()) for t in v.split(",")}
    drop = HOP_BY_HOP | named
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


class Activator:
    """The server; ``port`` 0 binds any free port (``port`` then tells which); ``held`` and
    ``held_bytes`` count the reservations of the requests it has taken (see the module)."""

    def __init__(
        self, directory: Directory, engine_port: int, port: int = c.ACTIVATOR_PORT,
        host: str = "0.0.0.0", *, max_body: int = MAX_BODY_BYTES, max_held: int = MAX_HELD,
        max_held_bytes: int = MAX_HELD_BYTES, max_reading: int = MAX_READING,
        read_timeout_s: float = READ_TIMEOUT_S, poll_s: float = POLL_S,
    ) -> None:  # fmt: skip
        self.directory, self.engine_port, self.port, self.host = directory, engine_port, port, host
        self.max_body, self.max_held, self.max_held_bytes = max_body, max_held, max_held_bytes
        self.max_reading, self.read_timeout_s, self.poll_s = max_reading, read_timeout_s, poll_s
        self.held = self.held_bytes = self.reading = 0
        self._held_by: collections.Counter[Key] = collections.Counter()
        self._turn = itertools.count()
        self._runner: aiohttp.web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    def holding(self, key: Key) -> bool:
        """Whether a request for ``key`` is held now (the autoscaler's activity)."""
        return self._held_by[key] > 0

    async def start(self) -> None:
        app = aiohttp.web.Application(client_max_size=self.max_body)
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = aiohttp.web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = aiohttp.web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        logger.info("activator listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _handle(self, request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        if request.path in PROBE_PATHS:
            return _error(503, "the deployment is scaled to zero; a probe does not wake it",
                          "scaled_to_zero", retry=True)  # fmt: skip
        key = self.directory.find(request.host)
        if key is None:
            return _error(404, "no LLMDeployment at zero replicas has the Service named by "
                               f"host {request.host!r}", "not_found")  # fmt: skip
        declared = request.content_length
        if declared is not None and declared > self.max_body:
            return _error(413, f"the body is larger than {self.max_body} bytes", "too_large")
        reserved = self.max_body if declared is None else declared
        if (self.held >= self.max_held or self.reading >= self.max_reading
                or self.held_bytes + reserved > self.max_held_bytes):  # fmt: skip
            return _error(503, "the activator holds as many requests as it may; retry later",
                          "activator_full", retry=True)  # fmt: skip
        self.held, self.held_bytes, self.reading = (
            self.held + 1,
            self.held_bytes + reserved,
            self.reading + 1,
        )
        self._held_by[key] += 1
        try:
            try:
                async with asyncio.timeout(self.read_timeout_s):
                    body = await read_bounded(request.content, reserved)
            except TimeoutError:
                return _error(408, f"the body did not arrive within {self.read_timeout_s:g} s",
                              "request_timeout")  # fmt: skip
            except (aiohttp.ClientPayloadError, ConnectionError) as error:
                logger.debug("activator: the client went away while sending: %s", error)
                return _error(400, "the body ended early", "incomplete_body")
            finally:
                self.reading -= 1
            if body is None:
                return _error(413, f"the body is larger than {self.max_body} bytes", "too_large")
            self.held_bytes -= reserved - len(body)
            reserved = len(body)
            self.directory.demand(key)
            address = await self._wait_for_pod(key)
            if address is None:
                return _error(
                    503,
                    f"LLMDeployment {key[0]}/{key[1]} is waking up and has no "
                    "ready engine pod yet; retry later",
                    "activating",
                    retry=True,
                )
            return await self._proxy(request, body, address)
        finally:
            self.held, self.held_bytes = self.held - 1, self.held_bytes - reserved
            self._held_by[key] -= 1
            if self._held_by[key] <= 0:
                del self._held_by[key]

    async def _wait_for_pod(self, key: Key) -> str | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.directory.hold_s(key)
        while not (addresses := self.directory.addresses(key)):
            left = deadline - loop.time()
            if left <= 0:
                return None
            await asyncio.sleep(min(self.poll_s, left))
        return addresses[next(self._turn) % len(addresses)]

    async def _proxy(self, request: aiohttp.web.Request, body: bytes,
                     address: str) -> aiohttp.web.StreamResponse:  # fmt: skip
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=10,
                                            sock_read=UPSTREAM_READ_TIMEOUT_S)  # fmt: skip
            self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)
        host = f"[{address}]" if ":" in address else address
        url = f"http://{host}:{self.engine_port}{request.rel_url}"
        headers = end_to_end(request.headers)
        forwarded = ", ".join([*headers.popall("X-Forwarded-For", ()), request.remote or ""])
        headers["X-Forwarded-For"] = forwarded
        response = aiohttp.web.StreamResponse()
        response.force_close()
        try:
            async with self._session.request(request.method, url, data=body, headers=headers,
                                             allow_redirects=False) as upstream:  # fmt: skip
                response.set_status(upstream.status, upstream.reason)
                response.headers.extend(end_to_end(upstream.headers))
                if upstream.content_length is not None:
                    response.content_length = upstream.content_length
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            logger.info("activator: engine pod %s did not answer: %s", address, error)
            if not response.prepared:
                return _error(502, "the engine pod did not answer", "bad_gateway")
            return response  # the answer was cut off midway; the client sees it end early
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response


def addresses_of(pods: Any) -> list[str]:
    """The pod IPs of ``pods`` (those that have one), in name order."""
    named = sorted((p.get("metadata", {}).get("name", ""), p.get("status", {}).get("podIP"))
                   for p in pods)  # fmt: skip
    return [ip for _, ip in named if ip]
