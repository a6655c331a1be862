"""The API server's own settings (the engine's live in :class:`EngineArgs`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from metroline.engine.server.protocol import MAX_PROMPTS


@dataclass(frozen=True)
class ServerArgs:
    """Checked on construction; a bad value raises ``ValueError`` naming the flag.

    Readiness has hysteresis: the server turns unready when KV-cache usage rises above
    ``ready_kv_threshold`` (or the waiting queue above ``ready_max_waiting``) and ready again
    only once usage is at or below ``ready_kv_low_watermark`` (and the queue at or below half
    its limit), so a pod near its limit does not flap in and out of its Service.
    """

    served_model_names: tuple[str, ...]
    host: str = "0.0.0.0"
    port: int = 8000
    api_key: str | None = None
    ready_kv_threshold: float = 0.95
    #: ``None``: ``ready_kv_threshold - 0.1`` (but not below 0).
    ready_kv_low_watermark: float | None = None
    #: ``None``: the waiting queue does not affect readiness.
    ready_max_waiting: int | None = None
    #: ``None``: never shed load; otherwise 503 once this many requests wait unscheduled.
    max_waiting_requests: int | None = None
    drain_timeout: float = 30.0
    #: Largest request body in bytes; a larger one is answered 413 before it is read whole.
    max_request_bytes: int = 16 * 2**20
    #: Largest number of sequences (prompts x ``n``) one request may ask for (400 beyond).
    max_sequences_per_request: int = 256
    #: Open client connections at most (lowered at start to fit the file-descriptor limit);
    #: past it, the longest-idle connection is closed, or the new one answered 503.
    max_connections: int = 4096
    #: Seconds a connection may take to send a request's headers (from its first byte, or
    #: from the connection's start for the first request); 0: no limit.
    header_timeout: float = 10.0
    #: Seconds an idle keep-alive connection stays open between requests.
    keep_alive_timeout: float = 5.0
    #: Seconds a client may take to send a request's body (408 beyond).
    body_timeout: float = 60.0
    #: Seconds a response may wait for a client that reads nothing; then it is dropped and
    #: its request aborted.
    send_timeout: float = 60.0
    #: Bytes of request bodies being tokenised at once at most (503 beyond, for any but
    #: the first): what queued preparation may hold in memory.
    max_preparing_bytes: int = 256 * 2**20
    log_level: int = logging.INFO
    log_format: str = "text"
    access_log: bool = True

    def __post_init__(self) -> None:
        if not self.served_model_names or not all(self.served_model_names):
            raise ValueError("--served-model-name needs at least one non-empty name")
        if not 0 < self.ready_kv_threshold <= 1:
            raise ValueError(
                f"--ready-kv-threshold must be in (0, 1]; got {self.ready_kv_threshold}"
            )
        low = self.kv_low_watermark
        if not 0 <= low <= self.ready_kv_threshold:
            raise ValueError(
                f"--ready-kv-low-watermark must be in [0, --ready-kv-threshold]; got {low}"
            )
        for name in ("ready_max_waiting", "max_waiting_requests"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0; got {value}")
        timeouts = ("drain_timeout", "header_timeout", "keep_alive_timeout", "body_timeout")
        for name in (*timeouts, "send_timeout"):
            value = getattr(self, name)
            if not value >= 0 or value == float("inf"):  # NaN fails the first test
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0 and finite; got {value}")
        counts = ("max_request_bytes", "max_sequences_per_request", "max_connections")
        for name in (*counts, "max_preparing_bytes"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {value}")
        if self.max_sequences_per_request > MAX_PROMPTS:
            raise ValueError(
                f"--max-sequences-per-request must be at most {MAX_PROMPTS}; "
                f"got {self.max_sequences_per_request}"
            )
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535]; got {self.port}")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"--log-format must be 'text' or 'json'; got {self.log_format!r}")

    @property
    def model_name(self) -> str:
        """The name responses and metrics carry."""
        return self.served_model_names[0]

    @property
    def kv_low_watermark(self) -> float:
        if self.ready_kv_low_watermark is not None:
            return self.ready_kv_low_watermark
        return max(0.0, self.ready_kv_threshold - 0.1)
