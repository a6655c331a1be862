"""Structured logs: ``text`` (a message, then ``key=value`` fields) or ``json`` (one object
per line). Code attaches fields with ``extra={"fields": {...}}``; lines written while an HTTP
request is handled carry its ``request_id`` (its ``X-Request-Id``); every finished request
gets one line from :func:`log_finished_request`."""

from __future__ import annotations

import json
import logging
import sys
import time

from ..client.request_events import FinishedRequest
from .request_ids import RequestIdLogFilter

request_logger = logging.getLogger("metroline.requests")


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _text_value(value: object) -> str:
    text = str(value)
    return json.dumps(text) if (not text or " " in text or "=" in text) else text


def configure_logging(level: int = logging.INFO, log_format: str = "text") -> None:
    """Send every logger (uvicorn's included) to stderr in one format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestIdLogFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def log_finished_request(request: FinishedRequest) -> None:
    ttft = request.ttft
    request_logger.info(
        "request finished",
        extra={
            "fields": {
                "request_id": request.request_id,
                "finish_reason": request.finish_reason,
                "prompt_tokens": request.num_prompt_tokens,
                "output_tokens": request.num_output_tokens,
                "ttft_s": round(ttft, 4) if ttft is not None else None,
                "queue_s": round(queue, 4) if (queue := request.queue_time) is not None else None,
                "total_s": round(request.e2e_latency, 4),
            }
        },
    )
