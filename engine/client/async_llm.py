"""The API server's handle on the engine core, which runs in a process of its own.

``AsyncLLM`` starts the core process through a :class:`CoreClient` (``multiprocessing``
spawn, anonymous pipes); the core's step results reach the event loop, are detokenised there
by an :class:`OutputProcessor` and put on one ``asyncio.Queue`` per request, which a
:class:`RequestStream` (from :meth:`AsyncLLM.generate`) turns into an async iterator.

Invariants (all state is touched on the event loop only):

- a request is in ``requests`` from ``generate`` until its last output, its error, or its
  abort, and nowhere after; closing or dropping its stream early (client gone, task
  cancelled) aborts it, so its KV blocks are free before the core's next step;
- once the core is gone, every waiting request gets :class:`EngineDeadError`, and so does
  every new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ..config import EngineConfig
from ..messages import (
    AddRequests,
    CoreReady,
    CoreStep,
    FinishRequests,
    RequestStatus,
    SchedulerStats,
)
from ..outputs import RequestOutput
from .core_client import CoreClient
from .input_processor import InputProcessor, ProcessedPrompt
from .output_processor import OutputProcessor
from .request_events import EngineObserver, FinishedRequest, IterationStats

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine core process is gone; nothing more will be generated."""


class RequestRejectedError(ValueError):
    """The engine core refused the request (its message says why)."""


class RequestAbortedError(RuntimeError):
    """The server ended the request (e.g. the drain timeout passed)."""


class RequestFailedError(RuntimeError):
    """Serving this request raised inside the engine (a bug, met by this request alone:
    the engine goes on serving the others)."""


@dataclass(slots=True)
class _RequestState:
    request_id: str
    queue: asyncio.Queue
    core_ids: list[str]
    arrival_time: float
    num_prompt_tokens: int
    scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_output_tokens: int = 0
    num_token_steps: int = 0

    def deliver(self, output: RequestOutput) -> None:
        """Queue ``output``, dropping outputs not read yet: they are cumulative, so only the
        latest matters, and a client that reads nothing holds one output, not one per step.
        (Errors come last: nothing is delivered after one.)"""
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(output)

    def finished(self, reasons: list[str], num_output_tokens: int) -> FinishedRequest:
        return FinishedRequest(
            request_id=self.request_id,
            num_prompt_tokens=self.num_prompt_tokens,
            num_output_tokens=num_output_tokens,
            finish_reasons=reasons,
            arrival_time=self.arrival_time,
            scheduled_time=self.scheduled_time,
            first_token_time=self.first_token_time,
            last_token_time=self.last_token_time,
            finished_time=time.monotonic(),
            num_token_steps=self.num_token_steps,
        )


class AsyncLLM:
    """The engine for an asyncio server: ``await start()``, then ``generate()`` per request
    (tokenised and validated beforehand by ``input_processor``), ``abort()``, and ``stats``
    (the core's latest :class:`SchedulerStats`)."""

    def __init__(
        self,
        config: EngineConfig,
        tokenizer: Any | None,
        observer: EngineObserver | None = None,
        log_setup: Callable[[], None] | None = None,
        core: CoreClient | None = None,
    ) -> None:
        """``core``: a client already launched (:meth:`CoreClient.launch`) for this config,
        whose model then loads while the caller prepares the tokenizer."""
        self.config = config
        self.tokenizer = tokenizer
        self.observer = observer or EngineObserver()
        self.input_processor = InputProcessor(config, tokenizer)
        self.output_processor = OutputProcessor(tokenizer)
        self.requests: dict[str, _RequestState] = {}
        self.stats: SchedulerStats | None = None
        self.num_blocks: int | None = None
        self.dead_reason: str | None = None
        self._parent_of: dict[str, str] = {}
        self._unscheduled: set[str] = set()
        self._core = core or CoreClient(config, log_setup)
        self._ready: asyncio.Future | None = None
        self._on_dead: list[Callable[[str], None]] = []

    # ---- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the core process and wait until its model is loaded (raises
        :class:`EngineDeadError` if it fails to start)."""
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._core.start(loop, self._on_message, self._on_core_gone)
        await self._ready

    def on_dead(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` on the event loop if the core dies."""
        self._on_dead.append(callback)

    @property
    def is_ready(self) -> bool:
        return self._ready is not None and self._ready.done() and self.dead_reason is None

    @property
    def core_pid(self) -> int | None:
        return self._core.process.pid if self._core.process is not None else None

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the core in order (or by force after ``timeout``); idempotent."""
        if not self._core.closing:
            self.abort_all()
        await self._core.shutdown(timeout)

    # ---- requests ------------------------------------------------------------------------

    @property
    def num_unscheduled(self) -> int:
        """User requests accepted but not yet scheduled by the core (the queue to shed)."""
        return len(self._unscheduled)

    def generate(self, processed: ProcessedPrompt, stream: bool = False) -> RequestStream:
        """Add the request now (it waits from this call on) and return its outputs: every
        step's cumulative state when ``stream``, else only the final one. Raises
        :class:`EngineDeadError` here, or :class:`RequestRejectedError` /
        :class:`RequestAbortedError` while iterating; closing the stream, or dropping it,
        before its last output aborts the request."""
        if self.dead_reason is not None or not self.is_ready:
            raise EngineDeadError(self.dead_reason or "the engine is not ready")
        request_id = processed.request_id
        if request_id in self.requests:
            raise RequestRejectedError(f"request id {request_id!r} is already in use")
        state = _RequestState(
            request_id=request_id,
            queue=asyncio.Queue(),
            core_ids=[c.request_id for c in processed.core_requests],
            arrival_time=processed.core_requests[0].arrival_time,
            num_prompt_tokens=len(processed.prompt_token_ids),
        )
        self.requests[request_id] = state
        self._unscheduled.add(request_id)
        for core_id in state.core_ids:
            self._parent_of[core_id] = request_id
        self.output_processor.add_request(
            request_id,
            processed.prompt,
            processed.prompt_token_ids,
            [(c.request_id, c.sampling_params) for c in processed.core_requests],
            arrival_time=state.arrival_time,
            stream=stream,
        )
        self._core.send(AddRequests(request_id, processed.core_requests))
        return RequestStream(self, state)

    def abort(self, request_id: str, notify: bool = False) -> None:
        """End a request now; with ``notify`` its iterator raises RequestAbortedError."""
        state = self._forget(request_id)
        if state is None:
            return
        pending = self.output_processor.abort_request(request_id)
        if pending and self.dead_reason is None:
            self._core.send(FinishRequests(pending, RequestStatus.FINISHED_ABORTED))
        reasons = ["abort"] * len(state.core_ids)
        self.observer.on_request_finished(state.finished(reasons, state.num_output_tokens))
        if notify:
            state.queue.put_nowait(RequestAbortedError("the server ended this request"))

    def abort_all(self) -> None:
        for request_id in list(self.requests):
            self.abort(request_id, notify=True)

    def _forget(self, request_id: str) -> _RequestState | None:
        state = self.requests.pop(request_id, None)
        if state is not None:
            self._unscheduled.discard(request_id)
            for core_id in state.core_ids:
                self._parent_of.pop(core_id, None)
        return state

    # ---- messages from the core, on the event loop ----------------------------------------

    def _on_message(self, message: Any) -> None:
        if isinstance(message, CoreStep):
            self._on_step(message)
        elif isinstance(message, CoreReady):
            self.num_blocks = message.num_blocks
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)

    def _on_core_gone(self, reason: str) -> None:
        if self._core.closing:
            return
        self.dead_reason = reason
        logger.error("%s; failing %d in-flight requests", reason, len(self.requests))
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(EngineDeadError(reason))
        for request_id in list(self.requests):
            state = self._forget(request_id)
            self.output_processor.abort_request(request_id)
            state.queue.put_nowait(EngineDeadError(reason))
        for callback in self._on_dead:
            callback(reason)

    def _on_step(self, step: CoreStep) -> None:
        for request_id, message in step.rejected:
            state = self._forget(request_id)
            if state is not None:
                self.output_processor.abort_request(request_id)
                state.queue.put_nowait(RequestRejectedError(message))
        for core_id, when in step.scheduled.items():
            state = self.requests.get(self._parent_of.get(core_id, ""))
            if state is not None and state.scheduled_time is None:
                state.scheduled_time = when
                self._unscheduled.discard(state.request_id)
        now = time.monotonic()
        iteration = IterationStats()
        touched: set[str] = set()
        for output in step.outputs:
            iteration.num_generation_tokens += len(output.new_token_ids)
            state = self.requests.get(self._parent_of.get(output.request_id, ""))
            if state is None or not output.new_token_ids:
                continue
            state.num_output_tokens += len(output.new_token_ids)
            if state.first_token_time is None:
                state.first_token_time = now
                iteration.num_prompt_tokens += state.num_prompt_tokens
            if state.request_id not in touched:
                touched.add(state.request_id)
                if state.last_token_time is not None:
                    iteration.inter_token_latencies.append(now - state.last_token_time)
                state.num_token_steps += 1
                state.last_token_time = now
        processed = self.output_processor.process_outputs(step.outputs)
        if processed.stopped_core_requests:
            self._core.send(
                FinishRequests(processed.stopped_core_requests, RequestStatus.FINISHED_STOPPED)
            )
        if processed.aborted_core_requests:
            self._core.send(
                FinishRequests(processed.aborted_core_requests, RequestStatus.FINISHED_ABORTED)
            )
        for request_output in processed.request_outputs:
            state = self.requests.get(request_output.request_id)
            if state is None:
                continue
            if request_output.error is not None:
                logger.error("request %s failed: %s", state.request_id, request_output.error)
                state.queue.put_nowait(RequestFailedError(request_output.error))
            else:
                state.deliver(request_output)
            if request_output.finished:
                self._forget(state.request_id)
                reasons = [c.finish_reason or "abort" for c in request_output.outputs]
                tokens = sum(len(c.token_ids) for c in request_output.outputs)
                self.observer.on_request_finished(state.finished(reasons, tokens))
        self.stats = step.stats
        self.observer.on_step(step.stats, iteration)


class RequestStream:
    """The outputs of one added request, as an async iterator (use it once)."""

    def __init__(self, engine: AsyncLLM, state: _RequestState) -> None:
        self._engine = engine
        self._state = state
        # Dropped without being read to the end (e.g. a response that never started): abort.
        weakref.finalize(
            self, _abort_from_anywhere, engine, state.request_id, asyncio.get_running_loop()
        )

    @property
    def request_id(self) -> str:
        return self._state.request_id

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        queue = self._state.queue
        try:
            while True:
                item = await queue.get()
                while isinstance(item, RequestOutput) and not queue.empty():
                    item = queue.get_nowait()  # outputs are cumulative: keep the latest
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            self.close()

    def close(self) -> None:
        """Abort the request unless it already ended."""
        if self._state.request_id in self._engine.requests:
            self._engine.abort(self._state.request_id)

    async def aclose(self) -> None:
        self.close()


def _abort_from_anywhere(engine: AsyncLLM, request_id: str, loop) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to abort
        loop.call_soon_threadsafe(engine.abort, request_id)
