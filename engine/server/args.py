"""The API server's own settings (the engine's live in :class:`EngineArgs`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..chat_templates import load_chat_template
from ..flags import knob
from .protocol import MAX_PROMPTS
from .tool_parsers import TOOL_PARSERS

#: Most values of one CORS flag (--allowed-origins and the like).
MAX_CORS_VALUES = 64


@dataclass(frozen=True)
class ServerArgs:
    """Checked on construction; a bad value raises ``ValueError`` naming the flag.

    Readiness has hysteresis: the server turns unready when KV-cache usage rises above
    ``ready_kv_threshold`` (or the waiting queue above ``ready_max_waiting``) and ready again
    only once usage is at or below ``ready_kv_low_watermark`` (and the queue at or below half
    its limit), so a pod near its limit does not flap in and out of its Service.
    """

    #: Names clients use (the first is the one responses and metrics carry).
    served_model_names: tuple[str, ...]
    host: str = knob("0.0.0.0", "address to listen on")
    port: int = knob(8000, "port to listen on")
    #: Flag made by the CLI (its default comes from $METROLINE_API_KEY).
    api_key: str | None = None
    ready_kv_threshold: float = knob(0.95, "KV-cache usage above which /ready answers 503")
    ready_kv_low_watermark: float | None = knob(
        None, "ready again at or below this KV usage (default: threshold - 0.1, not below 0)"
    )
    ready_max_waiting: int | None = knob(
        None, "waiting requests above which /ready answers 503 (default: not considered)"
    )
    max_waiting_requests: int | None = knob(
        None, "answer 503 + Retry-After once this many requests wait (default: no limit)"
    )
    drain_timeout: float = knob(30.0, "seconds in-flight requests get to finish on SIGTERM")
    max_request_bytes: int = knob(
        16 * 2**20, "largest request body in bytes; larger ones are answered 413 unread"
    )
    max_sequences_per_request: int = knob(256, "largest prompts x n of one request (400 beyond)")
    max_connections: int = knob(
        4096,
        "open client connections at most (lowered at start to fit the file-descriptor limit); "
        "past it the longest-idle connection is closed, or the new one answered 503",
    )
    header_timeout: float = knob(
        10.0,
        "seconds a connection may take to send a request's headers (from its first byte, or "
        "from the connection's start for the first request); 0: no limit",
    )
    keep_alive_timeout: float = knob(5.0, "seconds an idle keep-alive connection stays open")
    body_timeout: float = knob(60.0, "seconds a client may take to send a body (408 beyond)")
    send_timeout: float = knob(
        60.0,
        "seconds a response may wait for a client that reads nothing; then it is dropped and "
        "its request aborted",
    )
    max_preparing_bytes: int = knob(
        256 * 2**20,
        "bytes of request bodies being tokenised at once, at most (503 beyond, for any but "
        "the first)",
    )
    allow_unknown_fields: bool = knob(
        False, "log and ignore request fields this server does not know, instead of a 400"
    )
    chat_template: str | None = knob(
        None,
        "Jinja chat template for /v1/chat/completions, used instead of the tokenizer's: a "
        "file holding it, or the template text itself",
    )
    trust_request_chat_template: bool = knob(
        False, "accept a chat_template field in chat requests (it runs on the server's CPU)"
    )
    enable_auto_tool_choice: bool = knob(
        False,
        'let the model call tools when it decides to (tool_choice "auto", the default when a '
        "request has tools); needs --tool-call-parser",
    )
    tool_call_parser: str | None = knob(
        None,
        'how tool calls are read from the model\'s text with tool_choice "auto" (the '
        "model's format)",
        choices=tuple(TOOL_PARSERS),
    )
    log_stats_interval: float = knob(
        10.0,
        "seconds between two stats log lines (throughput, requests, KV usage, prefix-cache "
        "hits) while the server is busy; 0: none",
    )
    disable_log_stats: bool = knob(False, "no periodic stats log line (vLLM's flag)")
    allowed_origins: tuple[str, ...] = knob(
        (),
        "origins a browser may call the API from (CORS), '*' for any, as values or one JSON "
        "list (default: no CORS headers)",
    )
    allowed_methods: tuple[str, ...] = knob(("*",), "HTTP methods CORS allows")
    allowed_headers: tuple[str, ...] = knob(("*",), "request headers CORS allows")
    allow_credentials: bool = knob(False, "CORS: allow cookies and authorization headers")
    #: The three below have flags of their own shape, made by the CLI.
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
        if not 0 <= self.log_stats_interval < float("inf"):
            raise ValueError(
                f"--log-stats-interval must be >= 0 and finite; got {self.log_stats_interval}"
            )
        for name in ("allowed_origins", "allowed_methods", "allowed_headers"):
            values = getattr(self, name)
            if len(values) > MAX_CORS_VALUES or not all(0 < len(v) <= 256 for v in values):
                raise ValueError(
                    f"--{name.replace('_', '-')} takes at most {MAX_CORS_VALUES} values of 1 "
                    f"to 256 characters; got {len(values)}"
                )
        if self.chat_template is not None:
            load_chat_template(self.chat_template)  # raises ValueError naming the flag
        parsers = ", ".join(TOOL_PARSERS)
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_PARSERS:
            raise ValueError(
                f"--tool-call-parser {self.tool_call_parser!r} is not one of {parsers}"
            )
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError(f"--enable-auto-tool-choice needs --tool-call-parser ({parsers})")

    @property
    def model_name(self) -> str:
        """The name responses and metrics carry."""
        return self.served_model_names[0]

    @property
    def kv_low_watermark(self) -> float:
        if self.ready_kv_low_watermark is not None:
            return self.ready_kv_low_watermark
        return max(0.0, self.ready_kv_threshold - 0.1)
