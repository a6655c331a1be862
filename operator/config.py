"""Operator settings, read once from the environment at start-up."""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from . import constants as c
from .backoff import Backoff

OWN_METRICS_PORT = 8081
"""The default port of the operator's own ``/metrics`` (8080 is kopf's ``/healthz``)."""
LEASE_NAME = "metroline-operator"
"""The default Lease of the leader election (``leader.py``); RBAC names it too."""
LEASE_NAMESPACE = "metroline-system"

@dataclass(frozen=True)
class OperatorConfig:
    """Knobs of one operator process; the defaults are the production values."""

    engine_image: str = c.DEFAULT_ENGINE_IMAGE
    metrics_port: int = c.HTTP_PORT
    """The engine pods' port, where the operator scrapes their KV-cache figure."""
    kv_interval_s: float = 15.0
    workers: int = 2
    health_port: int = 8080
    own_metrics_port: int = OWN_METRICS_PORT
    """Where the operator serves its own ``/metrics`` (``metrics.py``); 0 serves nothing."""
    backoff: Backoff = field(default_factory=Backoff)
    instance: str = field(default_factory=socket.gethostname)
    """Names this process in the Events it writes and is its leader-election identity (the
    pod's name: ``METROLINE_POD_NAME`` from the downward API, else the hostname)."""
    lease_name: str = LEASE_NAME
    lease_namespace: str = LEASE_NAMESPACE
    """The pod's own namespace (``METROLINE_NAMESPACE`` from the downward API)."""
    lease_duration_s: int = 15
    """How long a standby waits, after the Lease last changed, before taking it."""
    lease_renew_deadline_s: float = 10.0
    """How long a leader may go without a successful renew before it stops writing."""
    lease_retry_period_s: float = 2.0
    """How often a replica tries to acquire or renew the Lease."""
    activator_port: int = c.ACTIVATOR_PORT
    """Where the activator (``activator.py``) listens; 0 binds any free port (tests)."""
    pod_ip: str | None = None
    """This replica's pod IP (``METROLINE_POD_IP`` from the downward API): the activator's
    address in the EndpointSlice a scaled-to-zero Service gets. None: no scale to zero."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> OperatorConfig:
        return cls(
            engine_image=env.get("METROLINE_ENGINE_IMAGE", c.DEFAULT_ENGINE_IMAGE),
            metrics_port=int(env.get("METROLINE_METRICS_PORT", c.HTTP_PORT)),
            kv_interval_s=float(env.get("METROLINE_KV_INTERVAL_SECONDS", 15.0)),
            workers=int(env.get("METROLINE_WORKERS", 2)),
            health_port=int(env.get("METROLINE_HEALTH_PORT", 8080)),
            own_metrics_port=int(env.get("METROLINE_OPERATOR_METRICS_PORT", OWN_METRICS_PORT)),
            instance=env.get("METROLINE_POD_NAME") or socket.gethostname(),
            lease_name=env.get("METROLINE_LEASE_NAME") or LEASE_NAME,
            lease_namespace=env.get("METROLINE_NAMESPACE") or LEASE_NAMESPACE,
            lease_duration_s=int(env.get("METROLINE_LEASE_DURATION_SECONDS", 15)),
            lease_renew_deadline_s=float(env.get("METROLINE_LEASE_RENEW_DEADLINE_SECONDS", 10)),
            lease_retry_period_s=float(env.get("METROLINE_LEASE_RETRY_PERIOD_SECONDS", 2)),
            activator_port=int(env.get("METROLINE_ACTIVATOR_PORT", c.ACTIVATOR_PORT)),
            pod_ip=env.get("METROLINE_POD_IP") or None,
        )

    def __post_init__(self) -> None:
        if not 0 <= self.own_metrics_port <= 65535:
            raise ValueError(f"METROLINE_OPERATOR_METRICS_PORT {self.own_metrics_port} is not "
                             "a port (0 turns the operator's /metrics off)")
        if self.own_metrics_port == self.health_port:
            raise ValueError(f"METROLINE_OPERATOR_METRICS_PORT and METROLINE_HEALTH_PORT are "
                             f"both {self.health_port}: the two servers need their own ports")
        if not 0 < self.lease_retry_period_s < self.lease_renew_deadline_s < self.lease_duration_s:
            raise ValueError(
                "leader election needs 0 < METROLINE_LEASE_RETRY_PERIOD_SECONDS < "
                "METROLINE_LEASE_RENEW_DEADLINE_SECONDS < METROLINE_LEASE_DURATION_SECONDS (a "
                "leader must stop writing before a standby may take its expired Lease), got "
                f"{self.lease_retry_period_s}, {self.lease_renew_deadline_s}, "
                f"{self.lease_duration_s}")
        if not 1 <= self.workers <= 64:
            raise ValueError(f"METROLINE_WORKERS must be in 1..64; got {self.workers}")
        if not 0 < self.kv_interval_s <= 3600:  # NaN fails too
            raise ValueError(
                f"METROLINE_KV_INTERVAL_SECONDS must be in (0, 3600]; got {self.kv_interval_s}"
            )
        if self.lease_duration_s > 2**31 - 1:  # the Lease's leaseDurationSeconds is an int32
            raise ValueError(
                f"METROLINE_LEASE_DURATION_SECONDS must be at most {2**31 - 1}; "
                f"got {self.lease_duration_s}"
            )
        ports = {"METROLINE_HEALTH_PORT": self.health_port,
                 "METROLINE_OPERATOR_METRICS_PORT": self.own_metrics_port}
        clash = [name for name, port in ports.items() if port and port == self.activator_port]
        if not 0 <= self.activator_port <= 65535 or clash:
            raise ValueError(f"METROLINE_ACTIVATOR_PORT {self.activator_port} must be a port "
                             f"of its own (0: any free one){', not ' + clash[0] if clash else ''}")
        if self.pod_ip is not None:
            try:
                ipaddress.ip_address(self.pod_ip)
            except ValueError:
                raise ValueError(f"METROLINE_POD_IP {self.pod_ip!r} is not an IP address") from None
        if not self.instance:
            raise ValueError("the operator needs an identity (METROLINE_POD_NAME)")
