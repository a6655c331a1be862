"""KMock's KubernetesEmulator, extended with the API-server behaviour the operator relies on.

KMock 0.8 stores objects and merges every PATCH into them. A real API server also:

* stamps ``metadata.uid``, ``creationTimestamp``, ``resourceVersion`` (bumped on every change)
  and ``generation`` (bumped only when something outside metadata and status changes);
* creates an object on a server-side apply (``application/apply-patch+yaml``) of a missing one,
  and replaces the fields the applier sends (so a field it stops sending disappears);
* keeps ``status`` apart: the main resource ignores ``status`` in patches, ``/status`` takes
  only ``status``;
* answers a no-op patch without a new resourceVersion or watch event;
* garbage-collects objects whose owner (by ``ownerReferences[].uid``) was deleted;
* answers JSON-patch (``application/json-patch+json``).

``fail(...)`` injects API errors (with an optional Retry-After) for chosen requests, before any
state changes — the way a flaky API server or a throttling front end behaves.
"""

from __future__ import annotations

import copy
import datetime
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
import yaml
from kmock._internal import dicts, enums

TIMESTAMP = "%Y-%m-%dT%H:%M:%SZ"


@dataclass
class Fault:
    method: str
    path: re.Pattern[str]
    status: int
    times: int
    retry_after: float | None = None


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime(TIMESTAMP)


def _content(obj: dict[str, Any]) -> dict[str, Any]:
    """What bumps ``generation``: everything but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


@attrs.define(kw_only=True)
class MetrolineEmulator(kmock.KubernetesEmulator):
    _rv: int = attrs.field(default=0, init=False)
    _faults: list[Fault] = attrs.field(factory=list, init=False)

    def fail(
        self, method: str, path: str, status: int, times: int = 1,
        retry_after: float | None = None,
    ) -> None:
        """Answer the next ``times`` requests matching ``method`` and ``path`` with ``status``."""
        self._faults.append(Fault(method.upper(), re.compile(path), status, times, retry_after))

    def clear_faults(self) -> None:
        self._faults.clear()

    def _take_fault(self, request: kmock.Request) -> Fault | None:
        for fault in self._faults:
            if fault.times > 0 and fault.method == request.method.value \
                    and fault.path.search(request.url.path):
                fault.times -= 1
                return fault
        return None

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        fault = self._take_fault(request)
        if fault is not None:
            response = await self._render_error(kmock.KubernetesError(
                status=fault.status, reason="InjectedFault", message=f"injected {fault.status}",
            ))
            if fault.retry_after is not None:
                response.headers["Retry-After"] = str(fault.retry_after)
            return response
        mutating = (enums.action.CREATE, enums.action.UPDATE, enums.action.DELETE)
        if request.resource is None or request.action not in mutating:
            return await super()._handle(request)
        async with self._lock:
            if request.action == enums.action.CREATE:
                obj, code = await self._create(request, self._payload(request)), 201
            elif request.action == enums.action.UPDATE:
                # As the API server: 201 when a server-side apply created the object.
                existed = self._live(self._key(request)) is not None
                obj, code = await self._update(request), 200 if existed else 201
            else:
                obj, code = await self._delete(request), 200
        return aiohttp.web.json_response(obj, status=code)

    @staticmethod
    def _payload(request: kmock.Request) -> Any:
        if request.data is not None:
            return request.data
        return yaml.safe_load(request.text) if request.text else {}

    def _key(self, request: kmock.Request, name: str | None = None) -> Any:
        return (request.resource, request.namespace, name or request.name)

    def _live(self, key: Any) -> dict[str, Any] | None:
        if key not in self._objects or self._objects[key].deleted:
            return None
        return copy.deepcopy(self._objects[key].raw)

    async def _store(
        self, request: kmock.Request, key: Any, obj: dict[str, Any], kind: str
    ) -> None:
        if key in self._objects:
            self._objects[key].create(obj)  # appends a version to the history
        else:
            self._objects[key] = obj
        await self._buses[request.resource].put({"type": kind, "object": copy.deepcopy(obj)})

    async def _create(self, request: kmock.Request, obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        namespace = request.namespace or meta.get("namespace")
        key = (request.resource, namespace, meta.get("name"))
        if self._live(key) is not None:
            raise kmock.KubernetesError(status=409, reason="AlreadyExists", message="exists")
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(),
                    resourceVersion=self._next_rv(), generation=1)
        if namespace is not None:
            meta["namespace"] = namespace
        await self._store(request, key, obj, "ADDED")
        return obj

    async def _update(self, request: kmock.Request) -> dict[str, Any]:
        key = self._key(request)
        old = self._live(key)
        content_type = request.headers.get("Content-Type", "").split(";")[0]
        payload = self._payload(request)
        if content_type == "application/apply-patch+yaml":
            if old is None:
                return await self._create(request, payload)
            new = self._apply(old, payload)
        elif old is None:
            raise kmock.KubernetesObjectNotFoundError()
        elif content_type == "application/json-patch+json":
            new = jsonpatch.apply_patch(old, payload, in_place=False)
        else:
            new = dict(dicts.merge_patch_dict(old, payload))
        if request.subresource == "status":
            new = {**old, "status": new.get("status")}
        elif request.subresource is None:
            new = {**new, "status": old.get("status")}
        new = {k: v for k, v in new.items() if v is not None}
        if json.dumps(new, sort_keys=True) == json.dumps(old, sort_keys=True):
            return old  # a no-op: no new resourceVersion, no watch event
        new["metadata"] = {**new["metadata"], "resourceVersion": self._next_rv()}
        if _content(new) != _content(old):
            new["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1
        await self._store(request, key, new, "MODIFIED")
        return new

    @staticmethod
    def _apply(old: dict[str, Any], applied: dict[str, Any]) -> dict[str, Any]:
        """The applier owns every field it sends: those replace the live ones wholesale."""
        new = copy.deepcopy(old)
        for field in ("labels", "annotations", "ownerReferences"):
            if field in applied.get("metadata", {}):
                new["metadata"][field] = copy.deepcopy(applied["metadata"][field])
        for field, value in applied.items():
            if field not in ("metadata", "status"):
                new[field] = copy.deepcopy(value)
        return new

    async def _delete(self, request: kmock.Request) -> dict[str, Any]:
        key = self._key(request)
        obj = self._live(key)
        if obj is None:
            raise kmock.KubernetesObjectNotFoundError()
        self._objects[key].delete()
        await self._buses[request.resource].put({"type": "DELETED", "object": obj})
        await self._collect_garbage(obj["metadata"]["uid"])
        return obj

    async def _collect_garbage(self, owner_uid: str) -> None:
        """Delete dependents of a deleted owner, transitively (background propagation)."""
        for (resource, namespace, name), stored in list(self._objects.items()):
            if stored.deleted:
                continue
            refs = stored.raw.get("metadata", {}).get("ownerReferences") or []
            if any(ref.get("uid") == owner_uid for ref in refs):
                obj = copy.deepcopy(stored.raw)
                self._objects[resource, namespace, name].delete()
                await self._buses[resource].put({"type": "DELETED", "object": obj})
                await self._collect_garbage(obj["metadata"]["uid"])
