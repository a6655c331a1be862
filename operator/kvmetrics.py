"""The load of ready engine pods, scraped from their Prometheus ``/metrics``.

One scrape of a pod gives a ``PodSample``: KV-cache use, running and waiting requests, and
the cumulative tokens and steps of ``metroline:iteration_tokens_total`` (so two scrapes give
the mean tokens per step between them). A sample needs the KV gauge; the others are None where
the page lacks them. The figures are advisory: a pod that does not answer within the timeout,
answers other than 200, or sends more than ``MAX_PAGE_BYTES`` gives no sample. Scraping never
blocks reconciliation: it runs in its own loop and only wakes the controller when a rounded
figure changes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from . import constants as c
from .http_session import LazySession

logger = logging.getLogger(__name__)

_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(?P<value>\S+)(?:\s+\S+)?$"
)
MAX_PAGE_BYTES = 1 << 20
"""A larger /metrics page is no sample (the engine's is tens of kB)."""
MAX_VALUE = float(2**53)
"""A sample above this (where floats stop counting exactly) is ignored, as a negative or
non-finite one is: the sums over a bounded page stay finite."""
_GAUGES = {
    c.KV_METRIC: "kv",
    c.WAITING_METRIC: "waiting",
    c.RUNNING_METRIC: "running",
    f"{c.STEP_TOKENS_METRIC}_sum": "step_tokens",
    f"{c.STEP_TOKENS_METRIC}_count": "steps",
}


@dataclass(frozen=True, slots=True)
class PodSample:
    """One pod's page: the KV gauge (0..1; the mean over its series), and the sums over series
    of the request gauges and of the step histogram's ``_sum`` and ``_count``."""

    kv_cache_utilization: float
    waiting: float | None = None
    running: float | None = None
    step_tokens: float | None = None
    steps: float | None = None


def parse_sample(text: str) -> PodSample | None:
    """The ``PodSample`` of a Prometheus text page, or None without a KV sample."""
    values: dict[str, list[float]] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        field = None if match is None else _GAUGES.get(match.group("name"))
        if field is None:
            continue
        try:
            value = float(match.group("value"))
        except ValueError:
            continue
        if math.isfinite(value) and 0 <= value <= MAX_VALUE:
            values.setdefault(field, []).append(value)
    kv = values.get("kv")
    if not kv:
        return None
    sums = {k: sum(v) for k, v in values.items() if k != "kv"}
    return PodSample(min(1.0, sum(kv) / len(kv)), **sums)


def parse_kv_usage(text: str) -> float | None:
    """Mean of the ``metroline:kv_cache_usage_perc`` samples in a Prometheus text page."""
    sample = parse_sample(text)
    return None if sample is None else sample.kv_cache_utilization


def kv_average(samples: Iterable[PodSample]) -> float | None:
    values = [s.kv_cache_utilization for s in samples]
    return sum(values) / len(values) if values else None


async def read_bounded(stream: aiohttp.StreamReader, limit: int) -> bytes | None:
    """All of ``stream``, or None once it passes ``limit`` bytes (the rest left unread)."""
    chunks, size = [], 0
    async for chunk in stream.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class KvScraper(LazySession):
    """Fetches /metrics from pod IPs; ``port`` is the engine's (overridable for tests)."""

    def __init__(self, port: int = c.HTTP_PORT, timeout_s: float = 2.0) -> None:
        self.port = port
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def _one(self, ip: str) -> PodSample | None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        host = f"[{ip}]" if ":" in ip else ip
        try:
            async with self._session.get(f"http://{host}:{self.port}{c.METRICS_PATH}") as resp:
                if resp.status != 200:
                    return None
                page = await read_bounded(resp.content, MAX_PAGE_BYTES)
                if page is None:
                    logger.debug("metrics page of %s is over %d bytes", ip, MAX_PAGE_BYTES)
                    return None
                return parse_sample(page.decode(resp.charset or "utf-8", errors="replace"))
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            logger.debug("no metrics from %s: %s", ip, error)
            return None

    async def samples(self, pods: Iterable[Mapping[str, Any]]) -> dict[str, PodSample]:
        """The sample of each given (ready) pod that answered, by pod name."""
        named = [(p.get("metadata", {}).get("name", ""), p.get("status", {}).get("podIP"))
                 for p in pods]  # fmt: skip
        named = [(name, ip) for name, ip in named if ip]
        results = await asyncio.gather(*(self._one(ip) for _, ip in named))
        return {name: s for (name, _), s in zip(named, results) if s is not None}

    async def average(self, pods: Iterable[Mapping[str, Any]]) -> float | None:
        """KV average over the given (ready) pods that answered, or None."""
        return kv_average((await self.samples(pods)).values())
