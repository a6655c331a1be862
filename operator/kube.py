"""A small asynchronous Kubernetes API client: server-side apply, status patches, deletes,
events.

Kopf watches; this client writes. It authenticates with the same ``kopf.ConnectionInfo`` that
the operator's login handler produced, and turns every failure into ``ApiError`` whose
``spec_problem`` says that the request itself is wrong (400, 422, and the 500 that a
server-side apply of a field the schema does not declare gets) and ``retryable`` whether trying
the same request again later can help (409, 429, other 5xx, timeouts, lost connections). The
controller decides what each means for status and retries with backoff, never in a tight loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import kopf

from . import constants as c
from .http_session import LazySession

logger = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
SPEC_STATUSES = frozenset({400, 422})
UNDECLARED_FIELD = "not declared in schema"
"""What structured-merge-diff says of a field that the target's schema lacks. The API server
answers it with 500 (not a ``metav1.Status`` error, so no ``reason``), even with strict field
validation; newer servers may answer 400 with the same words."""
_PATHS = {
    ("v1", "Service"): "/api/v1/namespaces/{namespace}/services/{name}",
    ("v1", "Pod"): "/api/v1/namespaces/{namespace}/pods/{name}",
    ("apps/v1", "Deployment"): "/apis/apps/v1/namespaces/{namespace}/deployments/{name}",
    ("policy/v1", "PodDisruptionBudget"):
        "/apis/policy/v1/namespaces/{namespace}/poddisruptionbudgets/{name}",
    (c.API_VERSION, c.KIND): f"/apis/{c.API_VERSION}/namespaces/{{namespace}}/{c.PLURAL}/{{name}}",
    ("coordination.k8s.io/v1", "Lease"):
        "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}",
    ("discovery.k8s.io/v1", "EndpointSlice"):
        "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices/{name}",
    ("inference.networking.k8s.io/v1", "InferencePool"):
        "/apis/inference.networking.k8s.io/v1/namespaces/{namespace}/inferencepools/{name}",
}


class ApiError(Exception):
    """A failed API call; ``status`` 0 means no HTTP answer (timeout, refused, reset)."""

    def __init__(
        self, status: int, reason: str, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message, self.retry_after = (
            status, reason, message, retry_after
        )

    @property
    def spec_problem(self) -> bool:
        """The request is wrong as sent (invalid, or a field its schema does not declare):
        sending it again cannot help, changing the spec can."""
        return self.status in SPEC_STATUSES or (
            self.status == 500 and UNDECLARED_FIELD in self.message
        )

    @property
    def retryable(self) -> bool:
        if self.spec_problem:
            return False
        return self.status == 0 or self.status in RETRYABLE_STATUSES


def object_path(api_version: str, kind: str, namespace: str, name: str) -> str:
    """The URL path of one namespaced object of a kind the operator writes."""
    return _PATHS[(api_version, kind)].format(namespace=namespace, name=name)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    try:
        return float(headers["Retry-After"])
    except (KeyError, ValueError):
        return None


class KubeClient(LazySession):
    """Writes to the API server. ``connect`` must be called (by the login handler) before use."""

    def __init__(self, timeout_s: float = 30.0) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(10.0, timeout_s))
        self._info: kopf.ConnectionInfo | None = None
        self._session: aiohttp.ClientSession | None = None
        self._connected = asyncio.Event()
        self.reauthenticate: Callable[[], kopf.ConnectionInfo | None] | None = None

    def connect(self, info: kopf.ConnectionInfo) -> None:
        """Use ``info`` for all later calls (a new session is opened lazily)."""
        if info is not self._info:
            self._info, old = info, self._session
            self._session = None
            if old is not None:
                asyncio.get_running_loop().create_task(old.close())
        self._connected.set()

    def _open(self) -> aiohttp.ClientSession:
        assert self._info is not None
        if self._session is None:
            info = self._info
            headers = {"User-Agent": f"{c.FIELD_MANAGER}/0.1", **info.as_http_headers()}
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=info.as_ssl_context()),
                headers=headers,
                timeout=self._timeout,
            )
        return self._session

    async def request(
        self, method: str, path: str, *, params: Mapping[str, str] | None = None,
        body: Any = None, content_type: str = "application/json",
    ) -> dict[str, Any]:
        """One API call; the decoded JSON answer, or ApiError."""
        return (await self._call(method, path, params, body, content_type))[1]

    async def _call(
        self, method: str, path: str, params: Mapping[str, str] | None, body: Any,
        content_type: str,
    ) -> tuple[int, dict[str, Any]]:
        """One API call; (HTTP status, decoded JSON answer), or ApiError."""
        await self._connected.wait()
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        for attempt in (1, 2):
            try:
                session = self._open()
                assert self._info is not None
                url = self._info.server.rstrip("/") + path  # keeps a proxy's path prefix
                async with session.request(
                    method, url, params=params, data=data, headers=headers
                ) as response:
                    text = await response.text()
                    if response.status == 401 and attempt == 1 and self._refresh():
                        continue
                    if response.status >= 400:
                        raise self._error(response.status, text, response.headers)
                    return response.status, json.loads(text) if text else {}
            except (TimeoutError, aiohttp.ClientError, OSError) as error:
                raise ApiError(0, type(error).__name__, str(error) or "no answer") from error
        raise ApiError(401, "Unauthorized", "credentials were refused twice")

    def _refresh(self) -> bool:
        info = self.reauthenticate() if self.reauthenticate else None
        if info is None:
            return False
        self.connect(info)
        return True

    @staticmethod
    def _error(status: int, text: str, headers: Mapping[str, str]) -> ApiError:
        try:
            payload = json.loads(text)
            reason, message = payload.get("reason") or "", payload.get("message") or text
        except (ValueError, AttributeError):
            reason, message = "", text
        return ApiError(status, reason or "Error", message[:2000], _retry_after(headers))

    async def apply(self, obj: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        """Server-side apply ``obj`` under the operator's field manager, taking over conflicts.
        Returns the live object and whether this call created it (the API server answers 201
        Created then, 200 OK otherwise)."""
        meta = obj["metadata"]
        path = object_path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        code, live = await self._call(
            "PATCH", path, {"fieldManager": c.FIELD_MANAGER, "force": "true"}, obj,
            "application/apply-patch+yaml",
        )
        return live, code == 201

    async def patch_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Merge-patch the LLMDeployment's status subresource (never its spec)."""
        path = object_path(c.API_VERSION, c.KIND, namespace, name) + "/status"
        return await self.request(
            "PATCH", path, params={"fieldManager": c.FIELD_MANAGER},
            body={"status": status}, content_type="application/merge-patch+json",
        )

    async def create_event(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """Create a ``v1`` Event (see ``events.event_body``)."""
        namespace = event["metadata"]["namespace"]
        return await self.request("POST", f"/api/v1/namespaces/{namespace}/events", body=event)

    async def patch_event(
        self, namespace: str, name: str, patch: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Merge-patch a ``v1`` Event (a repeat: its ``count`` and ``lastTimestamp``)."""
        return await self.request(
            "PATCH", f"/api/v1/namespaces/{namespace}/events/{name}", body=patch,
            content_type="application/merge-patch+json",
        )

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        """Delete one object; an already absent object is fine."""
        try:
            await self.request(
                "DELETE", object_path(api_version, kind, namespace, name),
                body={"propagationPolicy": "Background"},
            )
        except ApiError as error:
            if error.status != 404:
                raise
