"""Operator settings, read once from the environment at start-up."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from . import constants as c
from .backoff import Backoff


@dataclass(frozen=True)
class OperatorConfig:
    """Knobs of one operator process; the defaults are the production values."""

    engine_image: str = c.DEFAULT_ENGINE_IMAGE
    metrics_port: int = c.HTTP_PORT
    kv_interval_s: float = 15.0
    workers: int = 2
    health_port: int = 8080
    backoff: Backoff = field(default_factory=Backoff)
    instance: str = field(default_factory=socket.gethostname)
    """Names this process in the Events it writes (a pod's hostname is its name)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> OperatorConfig:
        return cls(
            engine_image=env.get("METROLINE_ENGINE_IMAGE", c.DEFAULT_ENGINE_IMAGE),
            metrics_port=int(env.get("METROLINE_METRICS_PORT", c.HTTP_PORT)),
            kv_interval_s=float(env.get("METROLINE_KV_INTERVAL_SECONDS", 15.0)),
            workers=int(env.get("METROLINE_WORKERS", 2)),
            health_port=int(env.get("METROLINE_HEALTH_PORT", 8080)),
        )
