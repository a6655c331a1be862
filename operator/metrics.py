"""The operator's own Prometheus metrics, served at ``/metrics`` on its own port.

The port is ``OperatorConfig.own_metrics_port`` (``METROLINE_OPERATOR_METRICS_PORT``, 8081 by
default; 0 serves nothing). It is not ``OperatorConfig.metrics_port``: that one is the engine
pods' port, which the operator scrapes for their KV-cache figure.

Every ``Controller`` has its own registry (two controllers in one process, as in the tests,
count apart). The endpoint is prometheus-client's WSGI server in a daemon thread: it answers
while the event loop is busy, and a scrape never touches the loop.

- ``metroline_operator_reconciles_total{result}``: finished reconciles of existing objects by
  outcome, as ``Controller.reconcile`` decides it (``RESULTS``): ``ok``; ``invalid_spec`` (the
  operator's checks or the API server refused the spec); ``forbidden`` (a 403 on a child);
  ``apply_failed`` (another failed write of a child); ``error`` (the reconcile raised before
  its outcome was written: 409/429, a failed status patch, a bug).
- ``metroline_operator_reconcile_duration_seconds``: histogram of those reconciles' durations.
- ``metroline_operator_work_queue_depth``: keys waiting for a worker (not those in progress,
  nor retries still in their backoff).
- ``metroline_operator_applies_total{kind}``: server-side applies the API server accepted.
- ``metroline_operator_api_errors_total{code}``: failed API calls of the operator (children,
  status, Events) by HTTP status; ``code="none"`` when no answer came (timeout, refused, reset).
- ``metroline_operator_kv_scrape_failures_total``: scrapes of a ready engine pod that gave no
  KV figure (no answer in time, not 200, or no KV sample in the page).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .kube import ApiError
from .kvmetrics import KvScraper

PREFIX = "metroline_operator_"
OK, INVALID_SPEC, FORBIDDEN, APPLY_FAILED, ERROR = (
    "ok", "invalid_spec", "forbidden", "apply_failed", "error"
)
RESULTS = (OK, INVALID_SPEC, FORBIDDEN, APPLY_FAILED, ERROR)
KINDS = ("Deployment", "Service", "PodDisruptionBudget", "InferencePool", "EndpointSlice")
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Up to the API client's 30 s timeout and beyond (one reconcile makes several calls)."""
SERVE_STOP_S = 5.0


class OperatorMetrics:
    """The operator's metrics in a registry of their own; ``queue_depth`` is read at scrape
    time (from the server's thread)."""

    def __init__(self, queue_depth: Callable[[], float] = lambda: 0) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = Counter(
            PREFIX + "reconciles", "Finished reconciles by result.", ["result"],
            registry=self.registry,
        )
        self.reconcile_seconds = Histogram(
            PREFIX + "reconcile_duration_seconds", "How long one reconcile took.",
            buckets=DURATION_BUCKETS, registry=self.registry,
        )
        self.queue_depth = Gauge(
            PREFIX + "work_queue_depth", "Keys waiting in the work queue for a worker.",
            registry=self.registry,
        )
        self.queue_depth.set_function(queue_depth)
        self.applies = Counter(
            PREFIX + "applies", "Server-side applies of children by kind.", ["kind"],
            registry=self.registry,
        )
        self.api_errors = Counter(
            PREFIX + "api_errors", "Failed Kubernetes API calls by HTTP status code.",
            ["code"], registry=self.registry,
        )
        self.kv_scrape_failures = Counter(
            PREFIX + "kv_scrape_failures", "Scrapes of a ready engine pod without a KV figure.",
            registry=self.registry,
        )
        for result in RESULTS:  # every series exists from the start, at 0
            self.reconciles.labels(result)
        for kind in KINDS:
            self.applies.labels(kind)

    def reconciled(self, result: str, seconds: float) -> None:
        self.reconciles.labels(result).inc()
        self.reconcile_seconds.observe(seconds)

    def applied(self, kind: str) -> None:
        self.applies.labels(kind).inc()

    def api_error(self, error: ApiError) -> None:
        self.api_errors.labels(str(error.status) if error.status else "none").inc()


class CountingKvScraper(KvScraper):
    """A ``KvScraper`` that counts each pod that gave no figure in ``failures``."""

    def __init__(self, failures: Counter, port: int) -> None:
        super().__init__(port=port)
        self.failures = failures

    async def _one(self, ip: str) -> float | None:
        value = await super()._one(ip)
        if value is None:
            self.failures.inc()
        return value


class MetricsServer:
    """``/metrics`` of ``registry`` on ``addr:port`` (port 0: any free one, see ``port``),
    from a daemon thread until ``close``."""

    def __init__(self, registry: CollectorRegistry, port: int, addr: str = "0.0.0.0") -> None:
        server, thread = prometheus_client.start_http_server(port, addr, registry)
        self._server: WSGIServer = server
        self._thread: threading.Thread = thread

    @property
    def port(self) -> int:
        return self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(SERVE_STOP_S)
