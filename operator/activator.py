"""The activator: an HTTP proxy in the operator process that holds requests while an
LLMDeployment scaled to zero wakes up.

After a scale to zero the engine Service keeps its name, port and selector; the operator adds
an EndpointSlice of that Service whose one endpoint is this server on the leader's pod
(``render.render_activator_slice``), so kube-proxy sends the Service's traffic here. Each
request is:

1. bounded: at most ``max_body`` bytes of body (413 beyond), ``max_held`` requests and
   ``max_held_bytes`` of bodies held at once (503 with ``Retry-After`` beyond);
2. matched to its LLMDeployment by ``Directory.find``: the ``Host`` header (``name.namespace``,
   ``name.namespace.svc[.domain]``; the Service's endpoint in status) or, failing that, the
   JSON body's ``model`` naming one deployment's served model (404 when neither tells);
3. reported (``Directory.demand``: the autoscaler wakes a deployment at zero, and counts the
   request as activity);
4. held until a ready engine pod exists (``Directory.addresses``, polled every ``poll_s``) for
   at most ``Directory.hold_s`` (``spec.autoscaling.activationTimeoutSeconds``), then proxied
   to one (round robin), its answer streamed back as it comes; or answered 503 with
   ``Retry-After`` when the hold ends first, 502 when the pod does not answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from typing import Any, Protocol

import aiohttp
import aiohttp.web

from . import constants as c
from .cache import Key
from .kvmetrics import read_bounded

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 2**20
"""The engine's own default ``--max-request-bytes``."""
MAX_HELD = 256
MAX_HELD_BYTES = 64 * 2**20
"""Bodies held at once, in all: the operator's memory limit is 512 MiB."""
RETRY_AFTER_S = 30
POLL_S = 0.25
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

    def find(self, host: str, model: str | None) -> Key | None: ...
    def demand(self, key: Key) -> None: ...
    def addresses(self, key: Key) -> list[str]: ...
    def hold_s(self, key: Key) -> float: ...


def _error(status: int, message: str, code: str, retry: bool = False) -> aiohttp.web.Response:
    kind = "service_unavailable" if status == 503 else "invalid_request_error"
    headers = {"Retry-After": str(RETRY_AFTER_S)} if retry else None
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return aiohttp.web.json_response(body, status=status, headers=headers)


def _model(body: bytes) -> str | None:
    """The ``model`` of a JSON body, if any."""
    try:
        value = json.loads(body).get("model") if body else None
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, str) else None


class Activator:
    """The server; ``port`` 0 binds any free port (``port`` then tells which)."""

    def __init__(
        self, directory: Directory, engine_port: int, port: int = c.ACTIVATOR_PORT,
        host: str = "0.0.0.0", *, max_body: int = MAX_BODY_BYTES, max_held: int = MAX_HELD,
        max_held_bytes: int = MAX_HELD_BYTES, poll_s: float = POLL_S,
    ) -> None:  # fmt: skip
        self.directory, self.engine_port, self.port, self.host = directory, engine_port, port, host
        self.max_body, self.max_held, self.max_held_bytes = max_body, max_held, max_held_bytes
        self.poll_s = poll_s
        self.held = self.held_bytes = 0
        self._turn = itertools.count()
        self._runner: aiohttp.web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        app = aiohttp.web.Application(client_max_size=self.max_body)
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = aiohttp.web.AppRunner(app, access_log=None)
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

    async def _read(self, request: aiohttp.web.Request) -> bytes | None:
        """The body, or None past ``max_body``."""
        if (request.content_length or 0) > self.max_body:
            return None
        return await read_bounded(request.content, self.max_body)

    async def _handle(self, request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        if self.held >= self.max_held or self.held_bytes >= self.max_held_bytes:
            return _error(503, "the activator holds as many requests as it may; retry later",
                          "activator_full", retry=True)  # fmt: skip
        body = await self._read(request)
        if body is None:
            return _error(413, f"the body is larger than {self.max_body} bytes", "too_large")
        key = self.directory.find(request.host, _model(body))
        if key is None:
            return _error(404, f"no LLMDeployment that scales to zero answers to host "
                               f"{request.host!r} or this model", "not_found")  # fmt: skip
        self.held, self.held_bytes = self.held + 1, self.held_bytes + len(body)
        try:
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
            self.held, self.held_bytes = self.held - 1, self.held_bytes - len(body)

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
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
            self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)
        host = f"[{address}]" if ":" in address else address
        url = f"http://{host}:{self.engine_port}{request.rel_url}"
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["X-Forwarded-For"] = request.remote or ""
        response = aiohttp.web.StreamResponse()
        try:
            async with self._session.request(request.method, url, data=body, headers=headers,
                                             allow_redirects=False) as upstream:  # fmt: skip
                response.set_status(upstream.status, upstream.reason)
                for name, value in upstream.headers.items():
                    if name.lower() not in HOP_BY_HOP:
                        response.headers.add(name, value)
                if upstream.content_length is not None:
                    response.content_length = upstream.content_length
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            logger.info("activator: engine pod %s did not answer: %s", address, error)
            if not response.prepared:
                return _error(502, f"the engine pod did not answer: {error}", "bad_gateway")
            return response  # the answer was cut off midway; the client sees it end early
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response


def addresses_of(pods: Any) -> list[str]:
    """The pod IPs of ``pods`` (those that have one), in name order."""
    named = sorted((p.get("metadata", {}).get("name", ""), p.get("status", {}).get("podIP"))
                   for p in pods)  # fmt: skip
    return [ip for _, ip in named if ip]
