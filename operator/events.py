"""Kubernetes Events for an LLMDeployment (pure functions): what ``kubectl describe llmd`` and
``kubectl get events`` show.

The operator records a transition, never a state: an event is written when a condition's
``(status, reason)`` changes between the status the cluster held and the one just patched,
and when the operator writes a child (apply, delete). Reconciling an unchanged object
therefore writes no event, and a retried reconcile writes each transition once (events are
derived from the status actually patched).

Event type: ``Warning`` when the new state is a problem (Degraded=True, an invalid spec, a
stalled rollout), otherwise ``Normal``. Conditions that share a reason and message (an invalid
spec makes Ready and Progressing say the same) give one event.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from metroline.operator import constants as c

#: Kubernetes stores longer messages but ``kubectl describe`` is unreadable past this.
MAX_EVENT_MESSAGE = 1024
WARNING_REASONS = frozenset({"InvalidSpec", "ProgressDeadlineExceeded"})
_sequence = itertools.count()


@dataclass(frozen=True)
class EventNote:
    """One event to write about an LLMDeployment."""

    type: str  # "Normal" or "Warning"
    reason: str  # UpperCamelCase, as Kubernetes reasons are
    message: str


def _state(conditions: Sequence[Mapping[str, Any]], kind: str) -> Mapping[str, Any] | None:
    return next((cond for cond in conditions if cond.get("type") == kind), None)


def condition_events(
    previous: Mapping[str, Any] | None, current: Mapping[str, Any]
) -> list[EventNote]:
    """Events for the condition changes from status ``previous`` to status ``current``.

    A condition that appears for the first time is reported unless it says all is well
    (Degraded=False on a new object is not news). Changes with the same reason and message
    give one event, worded by the first condition and a Warning if any of them is a problem
    (a crash loop makes Ready=False and Degraded=True with the same words)."""
    old = (previous or {}).get("conditions") or []
    notes: dict[tuple[str, str], EventNote] = {}  # by (reason, condition message)
    for new in current.get("conditions") or []:
        kind, status, reason = new["type"], new["status"], new["reason"]
        before = _state(old, kind)
        if before is not None and (before.get("status"), before.get("reason")) == (status, reason):
            continue
        problem = (kind == "Degraded" and status == "True") or reason in WARNING_REASONS
        if before is None and kind == "Degraded" and not problem:
            continue
        detail = new.get("message") or ""
        message = f"{kind} is {status}" + (f": {detail}" if detail else "")
        if kind == "Degraded" and not problem:
            reason, message = "Recovered", "Degraded is False: no pod problem remains"
        kind_of_event = "Warning" if problem else "Normal"
        first = notes.get((reason, detail))
        if first is not None:
            if problem:
                notes[(reason, detail)] = EventNote("Warning", first.reason, first.message)
            continue
        notes[(reason, detail)] = EventNote(kind_of_event, reason, message[:MAX_EVENT_MESSAGE])
    return list(notes.values())


def event_body(
    llmd: Mapping[str, Any], note: EventNote, now: str, instance: str
) -> dict[str, Any]:
    """A ``v1`` Event about ``llmd``; the name is unique per operator process (the owner's
    name plus a hexadecimal time and sequence number, as client-go's recorder does)."""
    meta = llmd["metadata"]
    suffix = f"{time.time_ns():x}{next(_sequence):04x}"
    involved = {"apiVersion": c.API_VERSION, "kind": c.KIND, "name": meta["name"],
                "namespace": meta["namespace"]}  # fmt: skip
    if meta.get("uid"):
        involved["uid"] = meta["uid"]
    if meta.get("resourceVersion"):
        involved["resourceVersion"] = meta["resourceVersion"]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{suffix}", "namespace": meta["namespace"]},
        "involvedObject": involved,
        "type": note.type,
        "reason": note.reason,
        "message": note.message,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
        "source": {"component": c.FIELD_MANAGER},
        "reportingComponent": c.FIELD_MANAGER,
        "reportingInstance": instance,
    }
