"""Which exceptions end the engine, and a test hook that raises one inside one request.

An exception caused by one request (its inputs, its sampling, its detokenising) must end
that request alone; only a fault that leaves the device or the process in doubt (CUDA
errors, out of memory, a lost tensor-parallel peer) must end the engine.
:func:`poisons_engine` tells the two apart.

Tests prove the isolation by injecting a fault: ``METROLINE_INJECT_FAULT="STAGE:TEXT"``
(read once, at import, in every process) makes :func:`inject` raise :class:`InjectedFault`
at ``STAGE`` for every request whose id ends with ``TEXT``. Stages: ``inputs`` (building a
step's inputs on a worker), ``sampling`` (the driver's sampling), ``update`` (the
scheduler taking a sampled token), ``detokenize`` (the API server's output processing).
Unset, :data:`ACTIVE` is False and callers skip the hook entirely.
"""

from __future__ import annotations

import os

ENV_VAR = "METROLINE_INJECT_FAULT"
STAGES = ("inputs", "sampling", "update", "detokenize")

#: Text found in the messages of CUDA, cuBLAS, cuDNN, NCCL and driver errors that older
#: torch raises as plain RuntimeErrors.
_DEVICE_MARKERS = (
    "CUDA error",
    "CUDA out of memory",
    "CUDA driver",
    "CUBLAS_STATUS",
    "CUDNN_STATUS",
    "cuDNN error",
    "NCCL error",
    "device-side assert",
    "illegal memory access",
    "ECC error",
)


class InjectedFault(RuntimeError):
    """The fault a test asked for."""


def _parse(value: str) -> dict[str, str]:
    if not value:
        return {}
    stage, sep, text = value.partition(":")
    if not sep or stage not in STAGES or not text:
        raise ValueError(f"{ENV_VAR} must be STAGE:TEXT with STAGE one of {STAGES}; got {value!r}")
    return {stage: text}


_FAULTS = _parse(os.environ.get(ENV_VAR, ""))
#: Whether any fault is to be injected (callers test this before calling :func:`inject`).
ACTIVE = bool(_FAULTS)


def inject(stage: str, request_id: str) -> None:
    """Raise :class:`InjectedFault` if a test asked for one at ``stage`` for this request."""
    text = _FAULTS.get(stage)
    if text is not None and request_id.endswith(text):
        raise InjectedFault(f"injected fault at {stage} for request {request_id}")


def poisons_engine(error: BaseException) -> bool:
    """True for faults that no single request explains: the engine must stop (a device or
    process fault, or not an ``Exception`` at all, e.g. KeyboardInterrupt)."""
    if not isinstance(error, Exception) or isinstance(error, MemoryError):
        return True
    if any(t.__name__ in ("OutOfMemoryError", "AcceleratorError") for t in type(error).__mro__):
        return True
    if type(error).__name__ in ("DistBackendError", "DistNetworkError", "WorkerFailedError"):
        return True
    text = str(error)
    return any(marker in text for marker in _DEVICE_MARKERS)


def describe(error: BaseException) -> str:
    """``Type: message`` of a request's failure, at most 500 characters."""
    from .sampling_params import shorten

    return shorten(f"{type(error).__name__}: {error}", 500)
