"""Spec validation on the operator's side: the second line behind the API server's.

The API server already enforces the schema and the CEL rules. This module re-parses the spec
with the same pydantic models, whose validators are the CEL rules' Python twins (requests
within limits, /dev/shm within the memory limit, no managed flag in extraArgs, no reserved
environment variable, no ``..`` segment), so an object stored before a schema change, or
written where the CRD is older, is still judged. It also checks the object's name (the twin of
``spec.OBJECT_RULES``: a DNS-1035 label), duplicate env names (the CRD's list-map keys), pod
labels the operator selects by (the operator only), the model URI's location, and the engine's
whole command line as ``metroline serve``'s argparse parser will read it once the kubelet has
expanded ``$(VAR)`` references (``managedflags.read_serve_args``): refused, a managed flag set
again, or a ``--drain-timeout`` out of bounds (it sizes the grace period). Every check's
cost is bounded by the schema's limits (quantities are parsed within ``quantity.py``'s bounds,
before any arithmetic), so a hostile spec cannot stall the event loop. Every problem is one
message that says what to change; any problem means condition Ready=False, reason
InvalidSpec, and no new children.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from . import constants as c
from .managedflags import UNSEEN, Unseen, read_serve_args, why_refused
from .modeluri import ModelLocation, parse_model_uri
from .pod import MAX_DRAIN_TIMEOUT_S, run_args
from .spec import MANAGED_FLAGS, OBJECT_RULES, LLMDeploymentSpec, managed_flag

__all__ = ["MANAGED_FLAGS", "RESERVED_ENV", "SpecCheck", "check_spec", "managed_flag"]

RESERVED_ENV = c.RESERVED_ENV
HINT = (" (argparse reads every argument that starts with '-' as a flag, unless it looks like "
        "a negative number or holds a space: give such a value in the flag's argument, "
        "--api-key=-x)")


@dataclass(frozen=True, slots=True)
class SpecCheck:
    """The verdict on one spec: ``spec`` and ``location`` are set exactly when it is valid."""

    spec: LLMDeploymentSpec | None
    location: ModelLocation | None
    problems: tuple[str, ...]

    @property
    def valid(self) -> bool:
        return not self.problems


def _pydantic_messages(error: ValidationError) -> list[str]:
    messages = []
    for item in error.errors():
        where = ".".join(str(part) for part in ("spec", *item["loc"]))
        messages.append(f"{where}: {item['msg']}")
    return messages


def _env_problems(spec: LLMDeploymentSpec) -> list[str]:
    """Duplicates (the CRD's list-map keys refuse them; a model parse does not)."""
    problems = []
    seen: set[str] = set()
    for var in spec.env or ():
        if var.name in seen:
            problems.append(f"spec.env sets {var.name} twice; keep one entry")
        seen.add(var.name)
    return problems


def _label_problems(spec: LLMDeploymentSpec) -> list[str]:
    clashes = sorted(set(spec.pod_labels or {}) & c.RESERVED_LABELS)
    return [
        f"spec.podLabels sets {key}, which the operator uses to select pods; remove it"
        for key in clashes
    ]


def _command_line_problems(spec: LLMDeploymentSpec, location: ModelLocation) -> list[str]:
    """What `metroline serve` would make of the rendered command line plus extraArgs."""
    if any(UNSEEN in arg for arg in spec.engine.extra_args):
        return ["spec.engine.extraArgs: an argument holds a NUL character, which no process "
                "can be given; remove it"]
    args = run_args(spec, location)
    rendered = read_serve_args(args[:len(args) - len(spec.engine.extra_args)])
    reading = read_serve_args(args)
    if rendered.error is not None:
        return [f"metroline serve would refuse the command line the operator renders from the "
                f"spec ({rendered.error}); check spec.model and spec.engine"]
    if reading.error is not None:
        hint = HINT if "expected" in reading.error else ""
        error = reading.error if len(reading.error) <= 400 else f"{reading.error[:400]}..."
        return [f"spec.engine.extraArgs: metroline serve would refuse its command line "
                f"({error}); fix extraArgs{hint}"]
    problems = [
        f"spec.engine.extraArgs sets {flag}{'' if written == flag else f' (as {written})'}, "
        f"{why_refused(flag)}"
        for flag, written in reading.calls[len(rendered.calls):] if flag in MANAGED_FLAGS
    ]
    drain = reading.values.get("drain_timeout")
    if isinstance(drain, Unseen):
        problems.append(
            "spec.engine.extraArgs: --drain-timeout must be a number the operator can read (it "
            "sizes the pods' grace period), not a Secret, ConfigMap or field reference"
        )
    elif drain is not None and not 0 <= drain <= MAX_DRAIN_TIMEOUT_S:  # NaN fails too
        problems.append(
            f"spec.engine.extraArgs: --drain-timeout {drain!r} must be a number of seconds from "
            f"0 to {MAX_DRAIN_TIMEOUT_S} (the pods' grace period is the preStop sleep, the whole "
            "drain and a margin)"
        )
    return problems


def check_spec(name: str, raw_spec: Mapping[str, Any] | None) -> SpecCheck:
    """Judge ``raw_spec`` of the LLMDeployment called ``name``; never raises."""
    problems: list[str] = []
    if not all(rule.holds(name) for rule in OBJECT_RULES):
        problems.append(
            f"metadata.name {name!r} must be a DNS-1035 label (a lowercase letter first, at most "
            "63 characters) because it names the Service; recreate it under such a name"
        )
    try:
        spec = LLMDeploymentSpec.model_validate(dict(raw_spec or {}))
    except ValidationError as error:
        return SpecCheck(None, None, (*problems, *_pydantic_messages(error)))
    location: ModelLocation | None = None
    try:
        location = parse_model_uri(spec.model.uri)
    except ValueError as error:
        problems.append(f"spec.{error}")
    problems += _env_problems(spec) + _label_problems(spec)
    if location is not None and not problems:
        problems += _command_line_problems(spec, location)
    if problems:
        return SpecCheck(None, None, tuple(problems))
    return SpecCheck(spec, location, ())
