"""KV-cache utilisation of ready engine pods, scraped from their Prometheus ``/metrics``.

The value is advisory: a pod that does not answer within the timeout is left out, and the
average is None when no ready pod answered. Scraping never blocks reconciliation: it runs in
its own loop and only wakes the controller when a rounded average changes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp

from . import constants as c
from .http_session import LazySession

logger = logging.getLogger(__name__)

_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(?P<value>\S+)(?:\s+\S+)?$"
)


def parse_kv_usage(text: str) -> float | None:
    """Mean of the ``metroline:kv_cache_usage_perc`` samples in a Prometheus text page."""
    values = []
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if match is None or match.group("name") != c.KV_METRIC:
            continue
        try:
            value = float(match.group("value"))
        except ValueError:
            continue
        if math.isfinite(value):
            values.append(min(1.0, max(0.0, value)))
    return sum(values) / len(values) if values else None


class KvScraper(LazySession):
    """Fetches /metrics from pod IPs; ``port`` is the engine's (overridable for tests)."""

    def __init__(self, port: int = c.HTTP_PORT, timeout_s: float = 2.0) -> None:
        self.port = port
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def _one(self, ip: str) -> float | None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        host = f"[{ip}]" if ":" in ip else ip
        try:
            async with self._session.get(f"http://{host}:{self.port}{c.METRICS_PATH}") as resp:
                if resp.status != 200:
                    return None
                return parse_kv_usage(await resp.text())
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            logger.debug("no metrics from %s: %s", ip, error)
            return None

    async def average(self, pods: Iterable[Mapping[str, Any]]) -> float | None:
        """Average over the given (ready) pods that answered, or None."""
        ips = [p.get("status", {}).get("podIP") for p in pods]
        results = await asyncio.gather(*(self._one(ip) for ip in ips if ip))
        values = [v for v in results if v is not None]
        return sum(values) / len(values) if values else None
