"""Running admitted requests: to the end (aborted if the client disconnects first), or as
one merged stream of outputs (aborted when the stream is closed early)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from fastapi import Request

from ..client.async_llm import (
    AsyncLLM,
    EngineDeadError,
    RequestAbortedError,
    RequestFailedError,
    RequestRejectedError,
    RequestStream,
)
from ..client.input_processor import ProcessedPrompt
from ..messages import GRAMMAR_TOO_COSTLY, NO_ALLOWED_TOKEN
from ..outputs import RequestOutput
from .admission import ClientGone, sse, wait_for_disconnect
from .errors import OpenAIError, bad_request, unavailable

#: Errors a request can end with once admitted; a stream reports them as an error event.
STREAM_ERRORS = (EngineDeadError, RequestRejectedError, RequestAbortedError, RequestFailedError)


def stream_error(error: Exception) -> str:
    """The error event a stream ends with: the body the same error has when not streamed."""
    return sse(engine_error(error).body())


def engine_error(error: Exception) -> OpenAIError:
    if isinstance(error, RequestRejectedError):
        return bad_request(str(error))
    if isinstance(error, RequestFailedError) and str(error) == NO_ALLOWED_TOKEN:
        return bad_request(str(error), code="constraints_conflict")
    if isinstance(error, RequestFailedError) and str(error) == GRAMMAR_TOO_COSTLY:
        return bad_request(str(error), code="grammar_too_costly")
    if isinstance(error, RequestFailedError):
        # A bug met by this request alone; the server goes on serving the others.
        return OpenAIError(500, f"the engine failed this request: {error}", code="engine_error")
    return unavailable(
        str(error), "engine_dead" if isinstance(error, EngineDeadError) else "aborted"
    )


async def final_outputs(streams: Sequence[RequestStream], request: Request) -> list[RequestOutput]:
    """Run every request to its end. The first to fail ends them all, as does the client
    disconnecting (:class:`ClientGone`); every task is ended before this returns."""

    async def run_one(stream: RequestStream) -> RequestOutput:
        async with contextlib.aclosing(stream):
            async for output in stream:
                if output.finished:
                    return output
        raise RequestAbortedError("the request ended without output")

    tasks = [asyncio.ensure_future(run_one(stream)) for stream in streams]
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        remaining = set(tasks)
        while remaining:
            done, _ = await asyncio.wait(remaining | {watcher}, return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:
                raise ClientGone()
            remaining -= done
            for task in done:
                error = task.exception()
                if isinstance(error, STREAM_ERRORS):
                    raise engine_error(error) from None
                if error is not None:
                    raise error
        return [task.result() for task in tasks]
    finally:
        watcher.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            stream.close()


async def merged(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Several streams as one, as ``(index, output)``; closing it aborts them all."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]):
            async for output in streams[0]:
                yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for output in stream:
                    queue.put_nowait((index, output))
        except Exception as error:  # handed to the consumer
            queue.put_nowait((index, error))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                remaining -= 1
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            stream.close()


def start(engine: AsyncLLM, processed: Sequence[ProcessedPrompt], stream: bool):
    """Add every prompt to the engine now, so that it counts as waiting at once."""
    streams: list[RequestStream] = []
    try:
        for p in processed:
            streams.append(engine.generate(p, stream=stream))
    except STREAM_ERRORS as error:
        for s in streams:
            s.close()
        raise engine_error(error) from None
    return streams
