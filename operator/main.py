"""Entry point: ``python -m metroline.operator`` runs the operator cluster-wide.

Environment: METROLINE_ENGINE_IMAGE (default engine image), METROLINE_METRICS_PORT (the
engine pods' metrics port, scraped for KV-cache use), METROLINE_KV_INTERVAL_SECONDS,
METROLINE_WORKERS, METROLINE_HEALTH_PORT (kopf's liveness endpoint, ``/healthz``; 8080),
METROLINE_OPERATOR_METRICS_PORT (the operator's own Prometheus ``/metrics``; 8081, 0 turns it
off), METROLINE_LOG_LEVEL; METROLINE_ACTIVATOR_PORT (the activator, which holds requests for a
deployment scaled to zero; 8082) and METROLINE_POD_IP (its address, from the downward API's
status.podIP; unset: no LLMDeployment scales to zero).

Leader election (only the holder of a coordination.k8s.io/v1 Lease writes): METROLINE_POD_NAME
(the identity; the downward API's metadata.name, else the hostname), METROLINE_NAMESPACE (the
Lease's namespace: the pod's, from the downward API; metroline-system), METROLINE_LEASE_NAME
(metroline-operator), METROLINE_LEASE_DURATION_SECONDS (15), METROLINE_LEASE_RENEW_DEADLINE_SECONDS
(10), METROLINE_LEASE_RETRY_PERIOD_SECONDS (2).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

import kopf

from .config import OperatorConfig
from .controller import Controller
from .handlers import build_registry
from .kube import KubeClient
from .leader import LeaderElector
from .metrics import MetricsServer


def build_parser() -> argparse.ArgumentParser:
    """No flags of its own: every setting comes from the environment (see the module doc);
    ``--help`` says so, anything else is an error (exit 2)."""
    return argparse.ArgumentParser(
        prog="python -m metroline.operator",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def main(argv: Sequence[str] | None = None) -> None:
    build_parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("METROLINE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    config = OperatorConfig.from_env()
    client = KubeClient()
    controller = Controller(client, config, elector=LeaderElector(client, config))
    port = config.own_metrics_port
    server = MetricsServer(controller.metrics.registry, port) if port else None
    try:
        kopf.run(
            registry=build_registry(controller),
            clusterwide=True,
            standalone=True,
            liveness_endpoint=f"http://0.0.0.0:{config.health_port}/healthz",
        )
    finally:
        if server is not None:
            server.close()


if __name__ == "__main__":
    main()
