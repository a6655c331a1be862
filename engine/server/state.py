"""Everything one server process shares between requests: the engine client, readiness,
metrics, the in-flight count, and the drain and exit logic."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from ..checkpoint import load_tokenizer
from ..client.async_llm import AsyncLLM
from ..client.core_client import CoreClient
from ..client.request_events import EngineObserver, FinishedRequest, IterationStats
from ..config import EngineConfig
from ..long_lived_heap import freeze_long_lived_heap
from ..messages import SchedulerStats
from .args import ServerArgs
from .json_body import JSONBudget
from .logs import configure_logging, log_finished_request
from .loop_lag import watch_loop_lag
from .metrics import ServerMetrics
from .readiness import Readiness
from .stats_logger import StatsLogger

logger = logging.getLogger(__name__)

#: After the engine core dies, keep answering /health with 503 this long before exiting.
DEAD_EXIT_DELAY_S = 1.0
#: Threads that tokenise and render chat templates off the event loop (the tokenizer's Rust
#: code runs without the GIL; more threads would take CPU from the engine core's step loop),
#: and threads that build long responses (apart, so that answers never wait behind prompts).
PREPARE_THREADS = 4
RESPOND_THREADS = 2

T = TypeVar("T")


class ServerState(EngineObserver):
    """Invariants: ``engine`` is set once the tokenizer is loaded and stays set; once
    ``readiness.draining`` is True it never turns False; ``request_exit`` is called at most
    once per reason (drain done: 0, engine dead: 1)."""

    def __init__(
        self,
        config: EngineConfig,
        args: ServerArgs,
        request_exit: Callable[[int], None] | None = None,
    ) -> None:
        self.config = config
        self.args = args
        self.engine: AsyncLLM | None = None
        self.metrics = ServerMetrics(args.model_name, config.model.max_model_len)
        self.stats_logger = StatsLogger(args.log_stats_interval)
        self.readiness = Readiness(
            kv_high=args.ready_kv_threshold,
            kv_low=args.kv_low_watermark,
            max_waiting=args.ready_max_waiting,
        )
        self.in_flight = 0
        self.json_budget = JSONBudget.for_server(
            args.max_sequences_per_request, config.model.max_model_len
        )
        #: Admitted requests still being tokenised and validated (not in the engine yet),
        #: and their body bytes.
        self.num_preparing = 0
        self.preparing_bytes = 0
        #: Set when the drain gave up waiting: nothing new may enter the engine.
        self.closing = False
        self.started_at = time.time()
        self._request_exit = request_exit or (lambda code: logger.info("exit %d requested", code))
        self._tasks: set[asyncio.Task] = set()
        self._prepare_pool = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="prepare")
        self._respond_pool = ThreadPoolExecutor(RESPOND_THREADS, thread_name_prefix="respond")

    async def off_loop(self, function: Callable[..., T], *args: object, respond: bool = False) -> T:
        """``function(*args)`` on a worker thread: for CPU work that grows with a request
        (tokenising and templates; with ``respond``, building a response), which must never
        hold up the event loop. Cancelled before it starts, it never runs. It runs in a copy
        of the caller's context (as ``asyncio.to_thread`` does), so the request's id
        (:func:`.request_ids.current_request_id`) reaches it and its log lines."""
        loop = asyncio.get_running_loop()
        pool = self._respond_pool if respond else self._prepare_pool
        context = contextvars.copy_context()
        return await loop.run_in_executor(pool, functools.partial(context.run, function, *args))

    # ---- engine observer -------------------------------------------------------------------

    def on_step(self, stats: SchedulerStats, iteration: IterationStats) -> None:
        self.metrics.on_step(stats, iteration)
        self.readiness.update(stats)
        self.stats_logger.record(stats, iteration)

    def on_request_finished(self, request: FinishedRequest) -> None:
        self.metrics.on_request_finished(request)
        log_finished_request(request)

    # ---- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Load in the background: probes answer while the model loads."""
        self._spawn(self._load())
        self._spawn(watch_loop_lag(self.metrics.loop_lag.observe))

    async def _load(self) -> None:
        started = time.monotonic()
        log_setup = functools.partial(configure_logging, self.args.log_level, self.args.log_format)
        core = CoreClient(self.config, log_setup)
        try:
            core.launch()  # the core loads the model while this process loads the tokenizer
            tokenizer = None
            if self.config.model.has_tokenizer:
                tokenizer = await self.off_loop(load_tokenizer, self.config.model.tokenizer_path)
                # One call settles the tokenizer's truncation and padding state, which a
                # call may otherwise change while another thread encodes.
                await self.off_loop(tokenizer, "warm-up")
            self.engine = AsyncLLM(self.config, tokenizer, self, log_setup, core=core)
            self.engine.on_dead(self._on_engine_dead)
            await self.engine.start()
        except Exception as error:  # any failure to load is fatal
            self._on_engine_dead(f"{type(error).__name__}: {error}")
            return
        finally:  # failed or cancelled (drain, shutdown) before an engine took the core
            if self.engine is None:
                core.abandon()
        # The app, the tokenizer and the engine client live as long as the process: one
        # collection now (bounded, at start-up), then later ones skip them.
        freeze_long_lived_heap()
        self.readiness.loaded = True
        self._log_kv_capacity(self.engine.num_blocks)
        self.metrics.set_cache_config(self.config.cache, self.engine.num_blocks)
        logger.info(
            "model %s ready in %.1f s",
            self.args.model_name,
            time.monotonic() - started,
            extra={"fields": {"kv_blocks": self.engine.num_blocks}},
        )
        if self.args.log_stats_interval > 0 and not self.args.disable_log_stats:
            self._spawn(self.stats_logger.run())

    def _log_kv_capacity(self, num_blocks: int) -> None:
        """vLLM's two start-up lines: the pool in tokens, and how many sequences of
        max_model_len tokens it holds at once."""
        block_size = self.config.cache.block_size
        max_len = self.config.model.max_model_len
        blocks_per_sequence = -(-max_len // block_size)
        logger.info(
            "KV cache size: %s tokens (%d blocks of %d)",
            f"{num_blocks * block_size:,}",
            num_blocks,
            block_size,
        )
        logger.info(
            "Maximum concurrency for %s tokens per request: %.2fx",
            f"{max_len:,}",
            num_blocks / blocks_per_sequence,
        )

    def _on_engine_dead(self, reason: str) -> None:
        if self.readiness.dead_reason is not None:
            return
        self.readiness.dead_reason = reason
        logger.error("engine core is dead (%s); exiting with status 1", reason)
        self._spawn(self._exit_later(1, DEAD_EXIT_DELAY_S))

    def begin_drain(self) -> None:
        """SIGTERM: unready at once, refuse new requests, let in-flight ones finish."""
        if self.readiness.draining:
            return
        self.readiness.draining = True
        logger.info(
            "draining: %d requests in flight, up to %.0f s", self.in_flight, self.args.drain_timeout
        )
        self._spawn(self._drain())

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.args.drain_timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.in_flight:
            logger.warning("drain timeout: aborting %d requests", self.in_flight)
            self.closing = True
            if self.engine is not None:
                self.engine.abort_all()
            grace = time.monotonic() + 2.0
            while self.in_flight and time.monotonic() < grace:
                await asyncio.sleep(0.05)
        logger.info("drained; exiting")
        self._request_exit(0)

    async def _exit_later(self, code: int, delay: float) -> None:
        await asyncio.sleep(delay)
        self._request_exit(code)

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.engine is not None:
            await self.engine.shutdown()
        for pool in (self._prepare_pool, self._respond_pool):
            pool.shutdown(wait=False, cancel_futures=True)

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_task_error)


def _log_task_error(task: asyncio.Task) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        if task.exception() is not None:
            logger.error("background task failed", exc_info=task.exception())
