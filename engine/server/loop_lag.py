"""A probe of the API server's event loop: how late a timer runs is how long the loop was
busy with something else. Every CPU-heavy step of a request (tokenising, chat templates,
building long responses) runs off the loop, so the lag stays near zero under any load; this
probe is how a test, or an SRE, sees whether it does."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

#: Seconds between two looks at the clock.
PROBE_INTERVAL_S = 0.1
#: A lag above this is logged (at most once per probe, so the log stays bounded).
WARN_LAG_S = 1.0


async def watch_loop_lag(observe: Callable[[float], None]) -> None:
    """Run until cancelled: every :data:`PROBE_INTERVAL_S` call ``observe(lag_seconds)``."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(PROBE_INTERVAL_S)
        lag = max(0.0, loop.time() - started - PROBE_INTERVAL_S)
        observe(lag)
        if lag > WARN_LAG_S:
            logger.warning("the event loop was blocked for %.2f s", lag)
