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
* answers JSON-patch (``application/json-patch+json``);
* answers a write to an undeclared resource (a CRD not installed) with a 404, and admits custom
  resources of the CRDs in ``emulator_crd.py`` (defaults, 422 ``Invalid``) as the server does;
* knows the built-in schema of the kinds the operator writes (Deployment, Service,
  PodDisruptionBudget, Pod; from kubernetes-validate's strict JSON schemas, see ``BuiltinSchema``
  in ``emulator_schema.py``) and those CRDs' schemas:
  a server-side apply with a field the schema does not declare is answered 500
  ``failed to create typed patch object (...): .path: field not declared in schema``, as
  structured-merge-diff answers it (real servers do, even with strict field validation);
* stores those kinds as a Go server re-encodes them: every ``Quantity`` in canonical form
  (``0.5`` -> ``500m``, ``1024Mi`` -> ``1Gi``: ``canonical_quantity``, after apimachinery's
  ``Quantity.String``), and optional (``omitempty``) strings, lists and maps that are empty left
  out (``env: [{name: X, value: ""}]`` comes back as ``[{name: X}]``);
* keeps ``metadata.managedFields`` (manager, operation, subresource, time; a simplified
  ``fieldsV1``), which ``kubectl get -o json`` prints only with ``--show-managed-fields``;
* answers PUT (an update: the body replaces the object, server-set metadata kept; 404 for a
  missing object, 400 for a name that is not the URL's) for any kind, e.g. the
  ``coordination.k8s.io/v1`` Lease of the operator's leader election;
* takes ``metadata.resourceVersion`` in a PUT or PATCH body as a precondition: a stale one is
  answered 409 ``Conflict`` ("the object has been modified; please apply your changes to the
  latest version and try again"), as optimistic concurrency on a real server is.

Not emulated: pruning of unknown fields on create, update and merge patch (they are kept),
type errors, validation beyond the undeclared-field check, defaulting, and ``omitempty`` of
numbers and booleans (the schema cannot tell pointers from plain fields).

``fail(...)`` injects API errors (with an optional Retry-After, reason and message) for chosen
requests, before any state changes — the way a flaky API server or a throttling front end behaves.
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

from . import emulator_crd
from .emulator_schema import builtin_schema
from .emulator_schema import canonical_quantity as canonical_quantity  # re-exported for tests

TIMESTAMP = "%Y-%m-%dT%H:%M:%SZ"


@dataclass
class Fault:
    method: str
    path: re.Pattern[str]
    status: int
    times: int
    retry_after: float | None = None
    reason: str | None = "InjectedFault"
    message: str | None = None


class StatusError(Exception):
    """An API answer with a ``Status`` body exactly as given (``reason`` left out when None, as
    the API server leaves it out of errors that are not ``metav1.Status`` errors)."""

    def __init__(self, code: int, message: str, reason: str | None = None,
                 details: dict[str, Any] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.code, self.message, self.reason, self.details = code, message, reason, details

    def response(self, retry_after: float | None = None) -> aiohttp.web.Response:
        body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                "status": "Failure", "message": self.message}
        if self.reason is not None:
            body["reason"] = self.reason
        if self.details is not None:
            body["details"] = self.details
        body["code"] = self.code
        response = aiohttp.web.json_response(body, status=self.code)
        if retry_after is not None:
            response.headers["Retry-After"] = str(retry_after)
        return response


def _fields_v1(obj: Any) -> Any:
    """A simplified ``fieldsV1`` of an applied configuration (``f:`` fields, ``k:`` items)."""
    if isinstance(obj, dict):
        return {f"f:{key}": _fields_v1(value) for key, value in obj.items()}
    if isinstance(obj, list) and all(isinstance(item, dict) and "name" in item for item in obj):
        return {"k:" + json.dumps({"name": item["name"]}, separators=(",", ":")): _fields_v1(item)
                for item in obj}  # fmt: skip
    return {}  # a scalar, or an atomic list


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
        retry_after: float | None = None, *, message: str | None = None,
        reason: str | None = "InjectedFault",
    ) -> None:
        """Answer the next ``times`` requests matching ``method`` and ``path`` with ``status``
        (and ``message``, ``reason``: None leaves ``reason`` out, as for a plain Go error)."""
        self._faults.append(Fault(method.upper(), re.compile(path), status, times, retry_after,
                                  reason, message))  # fmt: skip

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
            message = fault.message or f"injected {fault.status}"
            return StatusError(fault.status, message, fault.reason).response(fault.retry_after)
        mutating = (enums.action.CREATE, enums.action.UPDATE, enums.action.DELETE)
        # KMock gives PUT no action; the API server treats it as an update of a named object.
        put = request.method.value == "PUT" and request.name is not None
        if request.resource is None or (request.action not in mutating and not put):
            return await super()._handle(request)
        if request.resource not in self.resources:  # e.g. a CRD that is not installed
            return StatusError(404, "the server could not find the requested resource",
                               "NotFound", {}).response()
        try:
            async with self._lock:
                if put:
                    obj, code = await self._replace(request), 200
                elif request.action == enums.action.CREATE:
                    obj = await self._create(request, self._payload(request), "Update")
                    code = 201
                elif request.action == enums.action.UPDATE:
                    # As the API server: 201 when a server-side apply created the object.
                    existed = self._live(self._key(request)) is not None
                    obj, code = await self._update(request), 200 if existed else 201
                else:
                    obj, code = await self._delete(request), 200
        except StatusError as error:
            return error.response()
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

    @staticmethod
    def _normalise(obj: dict[str, Any]) -> dict[str, Any]:
        """As a Go server re-encodes a built-in object (canonical quantities, no empty
        optional fields), and admits a custom resource of a known CRD (defaults, or a 422:
        ``emulator_crd.py``); other objects as they are."""
        schema = builtin_schema()
        if emulator_crd.knows(obj):
            stored, invalid = emulator_crd.admit(obj)
            if invalid is not None:
                raise StatusError(422, invalid, "Invalid")
            return stored
        return schema.normalise(obj).obj if schema.knows(obj) else obj

    @staticmethod
    def _check_declared(request: kmock.Request, applied: Any) -> None:
        """Server-side apply converts the configuration to its schema's type first; a field
        the schema lacks fails that conversion, and the API server answers 500 with SMD's
        words (no ``reason``: it is not a ``metav1.Status`` error)."""
        schema = builtin_schema()
        if schema.knows(applied):
            undeclared = schema.normalise(applied).undeclared
        elif emulator_crd.knows(applied):
            undeclared = emulator_crd.undeclared(applied)
        else:
            return
        if not undeclared:
            return
        meta = applied.get("metadata") or {}
        group_version = applied["apiVersion"] if "/" in applied["apiVersion"] else \
            "/" + applied["apiVersion"]
        where = f"{request.namespace or meta.get('namespace', '')}/{meta.get('name', '')}"
        errors = [f"{path}: field not declared in schema" for path in undeclared]
        detail = errors[0] if len(errors) == 1 else "\n".join(
            ["errors:", *(f"  {error}" for error in errors)])
        raise StatusError(500, f"failed to create typed patch object ({where}; "
                               f"{group_version}, Kind={applied['kind']}): {detail}")

    @staticmethod
    def _manager(request: kmock.Request) -> str:
        """The field manager: the ``fieldManager`` parameter, else the User-Agent's product."""
        manager = request.params.get("fieldManager")
        if manager:
            return manager
        agent = request.headers.get("User-Agent") or "unknown"
        return agent.split("/", 1)[0] or "unknown"

    def _manage(
        self, request: kmock.Request, obj: dict[str, Any], operation: str, fields: Any
    ) -> None:
        """Record in ``obj`` that this request's manager wrote ``fields`` (one entry per
        manager, operation and subresource, as the API server keeps them)."""
        entry: dict[str, Any] = {
            "manager": self._manager(request), "operation": operation,
            "apiVersion": obj.get("apiVersion", ""), "time": _now(), "fieldsType": "FieldsV1",
            "fieldsV1": _fields_v1(fields),
        }
        if request.subresource:
            entry["subresource"] = request.subresource
        same = ("manager", "operation", "subresource")
        entries = [e for e in obj["metadata"].get("managedFields") or []
                   if tuple(e.get(k) for k in same) != tuple(entry.get(k) for k in same)]
        obj["metadata"]["managedFields"] = [*entries, entry]

    async def _store(
        self, request: kmock.Request, key: Any, obj: dict[str, Any], kind: str
    ) -> None:
        if key in self._objects:
            self._objects[key].create(obj)  # appends a version to the history
        else:
            self._objects[key] = obj
        await self._buses[request.resource].put({"type": kind, "object": copy.deepcopy(obj)})

    async def _create(
        self, request: kmock.Request, obj: dict[str, Any], operation: str
    ) -> dict[str, Any]:
        obj = self._normalise(copy.deepcopy(obj))
        meta = obj.setdefault("metadata", {})
        namespace = request.namespace or meta.get("namespace")
        key = (request.resource, namespace, meta.get("name"))
        if self._live(key) is not None:
            raise kmock.KubernetesError(status=409, reason="AlreadyExists", message="exists")
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(),
                    resourceVersion=self._next_rv(), generation=1)
        if namespace is not None:
            meta["namespace"] = namespace
        self._manage(request, obj, operation, _content(obj) | {"metadata": {
            k: v for k, v in meta.items() if k in ("labels", "annotations", "ownerReferences")
        }})
        await self._store(request, key, obj, "ADDED")
        return obj

    async def _update(self, request: kmock.Request) -> dict[str, Any]:
        key = self._key(request)
        old = self._live(key)
        content_type = request.headers.get("Content-Type", "").split(";")[0]
        payload = self._payload(request)
        applying = content_type == "application/apply-patch+yaml"
        if applying:
            self._check_declared(request, payload)
            if old is None:
                return await self._create(request, payload, "Apply")
            new = self._apply(old, payload)
        elif old is None:
            raise kmock.KubernetesObjectNotFoundError()
        elif content_type == "application/json-patch+json":
            new = jsonpatch.apply_patch(old, payload, in_place=False)
        else:
            new = dict(dicts.merge_patch_dict(old, payload))
        self._precondition(request, old, payload)
        return await self._commit(request, key, old, new, "Apply" if applying else "Update",
                                  payload if isinstance(payload, dict) else {})  # fmt: skip

    async def _replace(self, request: kmock.Request) -> dict[str, Any]:
        """PUT: the body is the new object; uid, creationTimestamp, generation and
        managedFields stay the server's."""
        key, resource = self._key(request), request.resource
        old, new = self._live(key), copy.deepcopy(self._payload(request))
        what = f"{resource.plural}.{resource.group}" if resource.group else resource.plural
        if old is None:
            raise StatusError(404, f'{what} "{request.name}" not found', "NotFound")
        meta = new.setdefault("metadata", {})
        if meta.get("name", request.name) != request.name:
            raise StatusError(400, f"the name of the object ({meta['name']}) does not match the "
                                   f"name on the URL ({request.name})", "BadRequest")
        self._precondition(request, old, new)
        kept = ("uid", "creationTimestamp", "resourceVersion", "generation", "managedFields",
                "namespace", "name")
        new["metadata"] = {**meta, **{k: old["metadata"][k] for k in kept
                                      if k in old["metadata"]}}  # fmt: skip
        return await self._commit(request, key, old, new, "Update", _content(new) | {
            "metadata": {k: v for k, v in meta.items() if k in ("labels", "annotations")}})

    @staticmethod
    def _precondition(request: kmock.Request, old: dict[str, Any], payload: Any) -> None:
        """A resourceVersion in the body must be the live one (optimistic concurrency)."""
        sent = ((payload if isinstance(payload, dict) else {}).get("metadata") or {}).get(
            "resourceVersion")
        if sent and sent != old["metadata"].get("resourceVersion"):
            resource = request.resource
            what = f"{resource.plural}.{resource.group}" if resource.group else resource.plural
            raise StatusError(409, f'Operation cannot be fulfilled on {what} "{request.name}": '
                                   "the object has been modified; please apply your changes to "
                                   "the latest version and try again", "Conflict",
                              {"name": request.name, "group": resource.group,
                               "kind": resource.plural})  # fmt: skip

    async def _commit(
        self, request: kmock.Request, key: Any, old: dict[str, Any], new: dict[str, Any],
        operation: str, fields: Any,
    ) -> dict[str, Any]:
        """Store ``new`` over ``old`` as the API server would (status kept apart, re-encoded,
        a no-op not written, resourceVersion and generation bumped, managedFields kept)."""
        if request.subresource == "status":
            new = {**old, "status": new.get("status")}
        elif request.subresource is None:
            new = {**new, "status": old.get("status")}
        new = self._normalise({k: v for k, v in new.items() if v is not None})
        if _unmanaged(new) == _unmanaged(old):
            return old  # a no-op: no new resourceVersion, no watch event
        new["metadata"] = {**new["metadata"], "resourceVersion": self._next_rv()}
        if _content(new) != _content(old):
            new["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1
        self._manage(request, new, operation, fields)
        await self._store(request, key, new, "MODIFIED")
        return new

    @staticmethod
    def _apply(old: dict[str, Any], applied: dict[str, Any]) -> dict[str, Any]:
        """The applier owns every field it sends: those replace the live ones wholesale."""
        new = copy.deepcopy(old)
        for field_name in ("labels", "annotations", "ownerReferences"):
            if field_name in applied.get("metadata", {}):
                new["metadata"][field_name] = copy.deepcopy(applied["metadata"][field_name])
        for field_name, value in applied.items():
            if field_name not in ("metadata", "status"):
                new[field_name] = copy.deepcopy(value)
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


def _unmanaged(obj: dict[str, Any]) -> str:
    """``obj`` without managedFields, as comparable text."""
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k != "managedFields"}
    return json.dumps({**obj, "metadata": meta}, sort_keys=True)
