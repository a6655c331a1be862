"""The engine pod template rendered from a valid spec (pure functions, no I/O).

Invariants of every rendered pod: the engine container requests exactly
``engine.tensorParallelSize`` ``nvidia.com/gpu``; ``/dev/shm`` is memory-backed; the startup probe
on /health allows ``startupTimeoutSeconds``; liveness is /health and readiness /ready; nothing
runs as root, escalates privileges or keeps a Linux capability; the grace period covers the
engine's drain timeout (its default, or the ``--drain-timeout`` that extraArgs set, as the
engine's parser reads it after ``$(VAR)`` expansion) and never exceeds 3620 s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from . import constants as c
from .managedflags import UNSEEN, read_serve_args
from .modeluri import ModelLocation
from .spec import LLMDeploymentSpec

PROBE_PERIOD_S = 10
PRE_STOP_SLEEP_S = 5
"""Seconds between a pod leaving the Service's endpoints and the engine getting SIGTERM."""
GRACE_MARGIN_S = 15
"""Seconds left after the drain for uvicorn and the engine core to exit."""
MAX_DRAIN_TIMEOUT_S = 3600
"""The longest ``--drain-timeout`` (seconds) that check_spec accepts; the grace period is thus
at most 3620 s, whatever extraArgs say."""
DOWNLOAD_EXCLUDES = ("*.bin", "*.pt", "*.pth", "*.gguf", "*.onnx", "original/*")
"""Hugging Face files the engine never reads (it loads safetensors)."""
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def engine_args(spec: LLMDeploymentSpec, location: ModelLocation) -> list[str]:
    """Arguments after ``metroline serve``: the model path, then one flag per set field."""
    engine = spec.engine
    args = [
        location.local_path,
        "--served-model-name", spec.model.served_name or location.default_served_name,
        "--host", "0.0.0.0",
        "--port", str(c.HTTP_PORT),
        "--tensor-parallel-size", str(engine.tensor_parallel_size),
        "--ready-kv-threshold", repr(spec.readiness.kv_cache_threshold),
    ]
    optional = (
        ("--max-model-len", engine.max_model_len),
        ("--gpu-memory-utilization", engine.gpu_memory_utilization),
        ("--max-num-seqs", engine.max_num_seqs),
        ("--max-num-batched-tokens", engine.max_num_batched_tokens),
        ("--block-size", engine.block_size),
        ("--dtype", engine.dtype),
    )
    for flag, value in optional:
        if value is not None:
            args += [flag, repr(value) if isinstance(value, float) else str(value)]
    if not engine.enable_prefix_caching:
        args.append("--no-enable-prefix-caching")
    return args + list(engine.extra_args)


def expand_refs(text: str, values: Mapping[str, str]) -> str:
    """``text`` after the kubelet's ``$(VAR)`` expansion (k8s.io/kubernetes third_party/forked/
    golang/expansion): ``$$`` is ``$``; an unknown ``$(VAR)`` and any other ``$`` stay as
    written."""
    out, cursor = [], 0
    while (start := text.find("$", cursor)) != -1 and start + 1 < len(text):
        out.append(text[cursor:start])
        after = text[start + 1]
        close = text.find(")", start + 2) if after == "(" else -1
        if after == "$":
            out.append("$")
            cursor = start + 2
        elif close != -1:
            name = text[start + 2:close]
            out.append(values.get(name, f"$({name})"))
            cursor = close + 1
        else:
            out.append("$" + after)
            cursor = start + 2
    return "".join(out) + text[cursor:]


def run_args(spec: LLMDeploymentSpec, location: ModelLocation) -> list[str]:
    """``engine_args`` as the kubelet hands them to ``metroline serve``: ``$(VAR)`` expanded
    with the container's env, and each value the operator cannot see (``valueFrom``: a Secret,
    a ConfigMap, a field) as ``UNSEEN`` text."""
    values: dict[str, str] = {}
    for var in _engine_env(spec, location):
        unseen = f"{UNSEEN}{var['name']}{UNSEEN}"
        values[var["name"]] = unseen if "valueFrom" in var else expand_refs(
            var.get("value", ""), values)
    return [expand_refs(arg, values) for arg in engine_args(spec, location)]


def drain_timeout_s(extra_args: Sequence[str]) -> float:
    """The engine's drain timeout under ``extra_args`` as ``metroline serve`` reads them (the
    last setting wins, an unambiguous prefix such as ``--drain`` counts), within
    ``[0, MAX_DRAIN_TIMEOUT_S]``; the default where they set none the operator can read
    (check_spec refuses such extraArgs, and any value outside the bounds)."""
    reading = read_serve_args([c.MODELS_DIR, *extra_args])
    value = reading.values.get("drain_timeout")
    if reading.error is not None or not isinstance(value, float) or not math.isfinite(value):
        return float(c.ENGINE_DRAIN_TIMEOUT_S)
    return min(max(0.0, value), float(MAX_DRAIN_TIMEOUT_S))


def grace_period_s(spec: LLMDeploymentSpec, location: ModelLocation) -> int:
    """preStop sleep, then the engine's whole drain, then a margin to exit."""
    args = run_args(spec, location)
    drain = drain_timeout_s(args[len(args) - len(spec.engine.extra_args):])
    return PRE_STOP_SLEEP_S + math.ceil(drain) + GRACE_MARGIN_S


def _security_context() -> dict[str, Any]:
    # readOnlyRootFilesystem stays off: torch and Triton write compile caches under $HOME.
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "runAsUser": c.RUN_AS_USER,
        "runAsGroup": c.RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _resources(spec: LLMDeploymentSpec, gpus: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if spec.resources is not None:
        for part in ("requests", "limits"):
            values = getattr(spec.resources, part)
            if values is not None:
                dumped = values.model_dump(by_alias=True, exclude_none=True)
                out[part] = {k: str(v) for k, v in dumped.items()}
    if gpus:
        out.setdefault("limits", {})["nvidia.com/gpu"] = str(gpus)
    return out


def _http_probe(path: str, period: int, timeout: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": c.HTTP_PORT_NAME},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def _engine_env(spec: LLMDeploymentSpec, location: ModelLocation) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    if location.scheme == "hf":
        env += [{"name": "HF_HOME", "value": c.HF_HOME}, {"name": "HF_HUB_OFFLINE", "value": "1"}]
    env += [var.model_dump(by_alias=True, exclude_none=True) for var in spec.env or ()]
    return env


def engine_container(
    spec: LLMDeploymentSpec, location: ModelLocation, image: str
) -> dict[str, Any]:
    """The `metroline serve` container."""
    mounts = [{"name": "dshm", "mountPath": c.SHM_MOUNT}]
    if has_cache_volume(spec, location):
        mounts.append({"name": "cache", "mountPath": c.CACHE_MOUNT})
    if location.scheme == "pvc":
        mounts.append({"name": "model", "mountPath": c.PVC_MODEL_MOUNT, "readOnly": True})
    container: dict[str, Any] = {
        "name": c.ENGINE_CONTAINER,
        "image": image,
        "command": ["metroline", "serve"],
        "args": engine_args(spec, location),
        "ports": [{"name": c.HTTP_PORT_NAME, "containerPort": c.HTTP_PORT, "protocol": "TCP"}],
        "resources": _resources(spec, spec.engine.tensor_parallel_size),
        "startupProbe": _http_probe(
            c.HEALTH_PATH, PROBE_PERIOD_S, 5,
            max(1, math.ceil(spec.startup_timeout_seconds / PROBE_PERIOD_S)),
        ),
        "livenessProbe": _http_probe(c.HEALTH_PATH, 15, 5, 4),
        "readinessProbe": _http_probe(c.READY_PATH, 5, 3, 2),
        "lifecycle": {"preStop": {"sleep": {"seconds": PRE_STOP_SLEEP_S}}},
        "volumeMounts": mounts,
        "securityContext": _security_context(),
    }
    env = _engine_env(spec, location)
    if env:
        container["env"] = env
    return container


def download_container(
    spec: LLMDeploymentSpec, location: ModelLocation, image: str
) -> dict[str, Any] | None:
    """For hf:// models, an init container that fills ``location.local_path`` (resumable)."""
    if location.scheme != "hf" or location.repo is None:
        return None
    command = ["hf", "download", location.repo, "--local-dir", location.local_path]
    if location.revision:
        command += ["--revision", location.revision]
    for pattern in DOWNLOAD_EXCLUDES:
        command += ["--exclude", pattern]
    env: list[dict[str, Any]] = [{"name": "HF_HOME", "value": c.HF_HOME}]
    token = spec.model.hf_token_secret_ref
    if token is not None:
        env.append({
            "name": "HF_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}},
        })
    return {
        "name": c.DOWNLOAD_CONTAINER,
        "image": image,
        "command": command,
        "env": env,
        "resources": _resources(spec, gpus=0),
        "volumeMounts": [{"name": "cache", "mountPath": c.CACHE_MOUNT}],
        "securityContext": _security_context(),
    }


def has_cache_volume(spec: LLMDeploymentSpec, location: ModelLocation) -> bool:
    return spec.cache is not None or location.scheme == "hf"


def volumes(spec: LLMDeploymentSpec, location: ModelLocation) -> list[dict[str, Any]]:
    """Shared memory for NCCL, the weights cache and, for pvc://, the model's claim."""
    shm_gib = 2 * spec.engine.tensor_parallel_size
    out: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gib}Gi"}}
    ]
    if spec.cache is not None:
        out.append({"name": "cache", "persistentVolumeClaim": {"claimName": spec.cache.claim_name}})
    elif location.scheme == "hf":
        out.append({"name": "cache", "emptyDir": {}})
    if location.scheme == "pvc":
        out.append({
            "name": "model",
            "persistentVolumeClaim": {"claimName": location.claim, "readOnly": True},
        })
    return out


def pod_spec(spec: LLMDeploymentSpec, location: ModelLocation, image: str) -> dict[str, Any]:
    """The PodSpec of every engine pod."""
    out: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": grace_period_s(spec, location),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": c.RUN_AS_USER,
            "runAsGroup": c.RUN_AS_USER,
            "fsGroup": c.RUN_AS_USER,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [engine_container(spec, location, image)],
        "volumes": volumes(spec, location),
        "tolerations": [dict(GPU_TOLERATION)] + [
            t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations or ()
        ],
    }
    init = download_container(spec, location, image)
    if init is not None:
        out["initContainers"] = [init]
    if spec.node_selector:
        out["nodeSelector"] = dict(spec.node_selector)
    if spec.affinity:
        out["affinity"] = spec.affinity
    if spec.priority_class_name:
        out["priorityClassName"] = spec.priority_class_name
    return out
