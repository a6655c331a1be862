"""Kubernetes Events for an LLMDeployment (pure functions): what ``kubectl describe llmd`` and
``kubectl get events`` show. ``recorder.py`` writes them.

The operator records transitions, never states: an event is due when a condition's
``(status, reason)`` changes between the status the cluster held and the one just patched,
and when the operator creates, updates or deletes a child. Reconciling an unchanged object
therefore yields no event. Failures (``InvalidSpec``, ``Forbidden``, ``ApplyFailed``) are news
whenever their message changes too: one event per distinct failure, none per retry of it.

Event type: ``Warning`` when the new state is a problem — Degraded=True, a condition that gives
the same reason as a Degraded=True one (a crash loop makes Ready=False/CrashLoopBackOff), Ready
turning False after it was True (an outage, whatever the reason), an invalid spec, a child the
API server did not take (``Forbidden``, ``ApplyFailed``), a stalled rollout — otherwise
``Normal``. ``Recovered`` is said only when Degraded clears while Ready is True. Conditions that
change with the same reason and message give one event.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import constants as c
from .status import APPLY_FAILED, FAILURE_REASONS, FORBIDDEN, INVALID_SPEC, find_condition

#: The API server's limit on an event's message for ``events.k8s.io``; kept for core events
#: too (``kubectl describe`` is unreadable past it).
MAX_EVENT_MESSAGE_BYTES = 1024
MAX_NAME = 253
WARNING_REASONS = frozenset({INVALID_SPEC, FORBIDDEN, APPLY_FAILED, "ProgressDeadlineExceeded"})


@dataclass(frozen=True)
class EventNote:
    """One event to write about an LLMDeployment."""

    type: str  # "Normal" or "Warning"
    reason: str  # UpperCamelCase, as Kubernetes reasons are
    message: str


def _cut(message: str) -> str:
    data = message.encode()
    return message if len(data) <= MAX_EVENT_MESSAGE_BYTES else (
        data[:MAX_EVENT_MESSAGE_BYTES].decode(errors="ignore")
    )


def condition_events(
    previous: Mapping[str, Any] | None, current: Mapping[str, Any]
) -> list[EventNote]:
    """Events for the condition changes from status ``previous`` to status ``current``.

    A condition that appears for the first time is reported unless it says all is well
    (Degraded=False on a new object is not news); a failure reason is reported again when its
    message changes (a different failure). Changes with the same reason and message give one
    event, worded by the first condition and a Warning if any of them is a problem."""
    old = (previous or {}).get("conditions") or []
    new_all = current.get("conditions") or []
    degraded = find_condition(new_all, "Degraded")
    degraded_reason = degraded["reason"] if degraded and degraded["status"] == "True" else None
    ready_now = find_condition(new_all, "Ready")
    ready_before = find_condition(old, "Ready")
    notes: dict[tuple[str, str], EventNote] = {}  # by (reason, condition message)
    for new in new_all:
        kind, status, reason = new["type"], new["status"], new["reason"]
        before = find_condition(old, kind)
        same = before is not None and (before.get("status"), before.get("reason")) == (
            status, reason)
        if same and (reason not in FAILURE_REASONS or before.get("message") == new.get("message")):
            continue
        outage = kind == "Ready" and status == "False" and reason != "ScaledToZero" and (
            ready_before is not None and ready_before.get("status") == "True"
        )
        problem = reason in WARNING_REASONS or outage or reason == degraded_reason
        detail = new.get("message") or ""
        message = f"{kind} is {status}" + (f": {detail}" if detail else "")
        if kind == "Degraded" and status == "False":
            if before is None or ready_now is None or ready_now["status"] != "True":
                continue  # not news on a new object; not a recovery while nothing serves
            was = before.get("reason") or "a problem"
            reason, message = "Recovered", f"Degraded is False (was {was})"
        first = notes.get((reason, detail))
        if first is not None:
            if problem:
                notes[(reason, detail)] = EventNote("Warning", first.reason, first.message)
            continue
        kind_of_event = "Warning" if problem else "Normal"
        notes[(reason, detail)] = EventNote(kind_of_event, reason, _cut(message))
    return list(notes.values())


def event_name(owner: str, suffix: str) -> str:
    """``<owner>.<suffix>``, the owner cut so the whole fits a DNS subdomain (253)."""
    keep = MAX_NAME - len(suffix) - 1
    return f"{owner[:keep].rstrip('.-')}.{suffix}"


def event_body(
    llmd: Mapping[str, Any], note: EventNote, now: str, instance: str, suffix: str
) -> dict[str, Any]:
    """A ``v1`` Event about ``llmd``, first seen ``now``, named ``event_name(name, suffix)``
    (the caller makes ``suffix`` unique, e.g. a hexadecimal time as client-go does)."""
    meta = llmd["metadata"]
    involved = {"apiVersion": c.API_VERSION, "kind": c.KIND, "name": meta["name"],
                "namespace": meta["namespace"]}  # fmt: skip
    if meta.get("uid"):
        involved["uid"] = meta["uid"]
    if meta.get("resourceVersion"):
        involved["resourceVersion"] = meta["resourceVersion"]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": event_name(meta["name"], suffix), "namespace": meta["namespace"]},
        "involvedObject": involved,
        "type": note.type,
        "reason": note.reason,
        "message": note.message,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
        "source": {"component": c.FIELD_MANAGER},
        "reportingComponent": c.FIELD_MANAGER,
        "reportingInstance": instance[:128],
    }
