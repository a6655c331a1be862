"""Spec validation beyond the CRD schema: the operator's half of "is this spec valid?".

The API server already enforces the schema and the CEL rules. This module re-parses the spec
with the same pydantic models (so an object stored before a schema change is still judged) and
adds the rules a schema cannot state: names that must fit a Service, flags and environment
variables the operator owns, requests above limits. Every problem is one message that says what
to change; any problem means condition Ready=False, reason InvalidSpec, and no new children.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from . import constants as c
from .modeluri import ModelLocation, parse_model_uri
from .quantity import parse_quantity
from .spec import LLMDeploymentSpec

DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

MANAGED_FLAGS = frozenset({
    "--tensor-parallel-size", "-tp", "--max-model-len", "--gpu-memory-utilization",
    "--max-num-seqs", "--max-num-batched-tokens", "--block-size", "--dtype",
    "--served-model-name", "--host", "--port", "--ready-kv-threshold", "--enable-prefix-caching",
    "--no-enable-prefix-caching",
})
"""Flags (with their aliases, e.g. ``-tp``) rendered from spec fields; setting them again in
extraArgs would be ambiguous. tests/operator/test_engine_cli.py keeps this in step with
``metroline serve``'s parser."""

RESERVED_ENV = frozenset({"HF_HOME", "HF_HUB_OFFLINE", "HF_TOKEN"})
"""Variables the operator sets in the engine or download container."""


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


def managed_flag(arg: str) -> str | None:
    """The rendered flag that ``arg`` would set on the engine's command line, if any.

    The engine parses with argparse, which also takes a unique prefix of a long flag
    (``--tensor-parallel 4``) and refuses an ambiguous one; either way a prefix of a rendered
    flag in extraArgs cannot work as the user meant.
    """
    flag = arg.split("=", 1)[0]
    if flag in MANAGED_FLAGS:
        return flag
    if flag.startswith("--") and len(flag) > 2:
        return next((f for f in sorted(MANAGED_FLAGS) if f.startswith(flag)), None)
    return None


def _flag_problems(spec: LLMDeploymentSpec) -> list[str]:
    problems = []
    for arg in spec.engine.extra_args:
        flag = managed_flag(arg)
        if flag is not None:
            shown = arg.split("=", 1)[0]
            what = shown if shown == flag else f"{shown} (read by the engine as {flag})"
            problems.append(
                f"spec.engine.extraArgs sets {what}, which the operator renders from the spec; "
                "remove it and use the matching spec field"
            )
    return problems


def _env_problems(spec: LLMDeploymentSpec) -> list[str]:
    problems = []
    seen: set[str] = set()
    for var in spec.env or ():
        if var.name in RESERVED_ENV:
            problems.append(f"spec.env sets {var.name}, which the operator manages; remove it")
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


def _resource_problems(spec: LLMDeploymentSpec) -> list[str]:
    if spec.resources is None or spec.resources.requests is None or spec.resources.limits is None:
        return []
    problems = []
    requests = spec.resources.requests.model_dump(by_alias=True, exclude_none=True)
    limits = spec.resources.limits.model_dump(by_alias=True, exclude_none=True)
    for resource, request in requests.items():
        if resource in limits and parse_quantity(request) > parse_quantity(limits[resource]):
            problems.append(
                f"spec.resources.requests.{resource} ({request}) exceeds "
                f"spec.resources.limits.{resource} ({limits[resource]}); lower the request "
                "or raise the limit"
            )
    return problems


def check_spec(name: str, raw_spec: Mapping[str, Any] | None) -> SpecCheck:
    """Judge ``raw_spec`` of the LLMDeployment called ``name``; never raises."""
    problems: list[str] = []
    if not DNS_1035_LABEL.match(name) or len(name) > 63:
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
    problems += _flag_problems(spec) + _env_problems(spec) + _label_problems(spec)
    try:
        problems += _resource_problems(spec)
    except ValueError as error:
        problems.append(f"spec.resources: {error}")
    if problems:
        return SpecCheck(None, None, tuple(problems))
    return SpecCheck(spec, location, ())
