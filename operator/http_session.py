"""An aiohttp session opened on first use and closed once (shared by the operator's HTTP
clients: the Kubernetes API client and the pods' /metrics scraper)."""

from __future__ import annotations

import aiohttp


class LazySession:
    """Holds ``_session``: None until a subclass opens it, None again after :meth:`close`."""

    _session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
