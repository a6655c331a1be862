"""Bounds of the server's request path, without processes: a stream holds one output however
slowly its client reads, a response whose client reads nothing is dropped after the send
timeout, and preparation is bounded in bytes and cancelled for clients that left."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from metroline.engine.client.async_llm import _RequestState
from metroline.engine.outputs import RequestOutput
from metroline.engine.server import admission
from metroline.engine.server.app import InFlightMiddleware
from metroline.engine.server.errors import OpenAIError


def test_a_stream_queues_only_its_latest_output():
    async def main() -> None:
        state = _RequestState("r", asyncio.Queue(), ["r"], 0.0, 1)
        for step in range(100):
            state.deliver(RequestOutput("r", None, [1], [], finished=step == 99))
        assert state.queue.qsize() == 1
        assert state.queue.get_nowait().finished

    asyncio.run(main())


def test_a_response_whose_client_reads_nothing_is_dropped():
    """The client's send never completes (uvicorn's write buffer stays full): after the send
    timeout the app's send raises, its stream is closed, and the middleware returns."""
    closed = []

    async def streaming_app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            while True:
                await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
        finally:
            closed.append(True)

    async def stuck_send(message) -> None:
        if message["type"] == "http.response.body":
            await asyncio.Event().wait()  # never

    state = SimpleNamespace(
        readiness=SimpleNamespace(draining=False),
        in_flight=0,
        args=SimpleNamespace(send_timeout=0.05),
    )
    middleware = InFlightMiddleware(streaming_app, state)
    scope = {"type": "http", "path": "/v1/completions"}
    asyncio.run(asyncio.wait_for(middleware(scope, None, stuck_send), 60))
    assert closed == [True] and state.in_flight == 0


class FakeRequest:
    """What ``admission.prepare`` uses of a request: its body, and its disconnect."""

    def __init__(self, body: bytes, gone: asyncio.Event) -> None:
        self._body, self._gone = body, gone

    async def body(self) -> bytes:
        return self._body

    async def receive(self) -> dict:
        await self._gone.wait()
        return {"type": "http.disconnect"}


def fake_state(max_preparing_bytes: int, pool_threads: int = 1):
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(pool_threads)

    async def off_loop(function, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, function, *args)

    state = SimpleNamespace(
        args=SimpleNamespace(max_preparing_bytes=max_preparing_bytes),
        num_preparing=0, preparing_bytes=0, closing=False, off_loop=off_loop,
    )  # fmt: skip
    return state, pool


def test_preparation_is_bounded_in_bytes_and_cancelled_for_clients_that_left():
    state, pool = fake_state(max_preparing_bytes=100)
    release = threading.Event()
    ran: list[str] = []

    def job(name: str) -> str:
        ran.append(name)
        release.wait(30)
        return name

    async def main() -> None:
        stay, leave = asyncio.Event(), asyncio.Event()
        first = asyncio.ensure_future(
            admission.prepare(state, FakeRequest(b"a" * 60, stay), job, "first")
        )
        await asyncio.sleep(0.01)
        assert state.num_preparing == 1 and state.preparing_bytes == 60
        # Over the budget while another is prepared: refused at once.
        with pytest.raises(OpenAIError) as refused:
            await admission.prepare(state, FakeRequest(b"b" * 60, stay), job, "second")
        assert refused.value.status == 503 and refused.value.code == "overloaded"
        # Within it, but queued behind the first on one thread; its client leaves.
        queued = asyncio.ensure_future(
            admission.prepare(state, FakeRequest(b"c" * 10, leave), job, "third")
        )
        await asyncio.sleep(0.01)
        leave.set()
        with pytest.raises(admission.ClientGone):
            await queued
        release.set()
        assert await first == "first"
        assert state.num_preparing == 0 and state.preparing_bytes == 0

    asyncio.run(main())
    pool.shutdown(wait=True)
    assert ran == ["first"]  # the third never ran
