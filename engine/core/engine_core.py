"""The engine core: one step is schedule -> execute -> update. Token ids only; no tokenizer.

With asynchronous scheduling (``async_scheduling``, on by default for CUDA) the core keeps
one step in flight: it plans and launches step N+1 while the device still runs step N, then
reads back step N's tokens. The host's work (scheduling, building inputs, turning tokens into
outputs) then overlaps the device's instead of leaving it idle. With TP, every rank gets the
tokens of step N on its device from rank 0 (a broadcast), so the plan of step N+1 can go out
before they reach the host. A request that stops at step N (EOS, stop token) has one extra
token computed at step N+1, which is dropped. Steps fall back to the plain order while a
request needs exact token history at sampling time (penalties, min_tokens, bad words
of several tokens).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, wait

from ..config import EngineConfig
from ..host_timing import HostTimer, merge_reports
from ..messages import (
    EngineCoreOutput,
    EngineCoreRequest,
    RequestStatus,
    SchedulerOutput,
    SchedulerStats,
)
from ..validation import validate_request
from ..worker.executor import create_executor
from ..worker.step_result import PendingSample, StepResult
from .grammars import GrammarManager, RequestGrammar
from .kv_cache import KVCacheManager
from .request import Request
from .scheduler import Scheduler

logger = logging.getLogger(__name__)


class EngineCore:
    """Invariant: a request added here produces outputs until one carries a finish reason,
    unless it is aborted (then it produces nothing more). A rejected request (``ValueError``
    from :meth:`add_request`) leaves the engine unchanged."""

    def __init__(self, config: EngineConfig) -> None:
        # Decided before the workers start: with TP they must know whether to expect each
        # step's sampled tokens from rank 0.
        self.async_scheduling = use_async_scheduling(
            config.async_scheduling, config.device.type, config.speculative is not None
        )
        config = dataclasses.replace(config, async_scheduling=self.async_scheduling)
        self.config = config
        self.executor = create_executor(config)
        num_blocks = self.executor.determine_num_blocks()
        block_size = config.cache.block_size
        max_len = config.model.max_model_len
        if num_blocks * block_size < max_len:
            raise ValueError(
                f"the KV pool holds {num_blocks * block_size} tokens ({num_blocks} blocks), "
                f"less than one sequence of max_model_len={max_len}; give the cache more "
                "memory (kv_cache_memory_bytes / gpu_memory_utilization) or lower max_model_len"
            )
        self.executor.initialize_cache(num_blocks)
        self.num_blocks = num_blocks
        self.kv_cache_manager = KVCacheManager(
            num_blocks, block_size, config.cache.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            config.scheduler, self.kv_cache_manager, config.speculative
        )
        self._in_flight: tuple[SchedulerOutput, StepResult] | None = None
        self.host_timer = HostTimer()
        self.grammars = GrammarManager(config)
        #: Requests whose grammar is still compiling, in arrival order, with when they came.
        self._compiling: dict[str, tuple[Request, Future, float]] = {}
        #: Outputs of requests failed while their step's bitmask was filled.
        self._grammar_failures: list[EngineCoreOutput] = []

    def add_request(self, spec: EngineCoreRequest) -> None:
        validate_request(spec, self.config)
        request_id = spec.request_id
        if request_id in self._compiling or request_id in self.scheduler.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = Request(spec)
        structured = spec.sampling_params.structured_outputs
        if structured is None:
            self.scheduler.add_request(request)
            return
        if len(self._compiling) >= MAX_COMPILING_REQUESTS:
            raise ValueError(
                f"{MAX_COMPILING_REQUESTS} requests already wait for their grammar to "
                "compile; retry later"
            )
        future = self.grammars.compile(structured)
        self._compiling[request_id] = (request, future, time.monotonic())

    def finish_requests(
        self,
        request_ids: Iterable[str],
        status: RequestStatus = RequestStatus.FINISHED_ABORTED,
    ) -> None:
        """End requests from outside (aborted by default, or stopped by a stop string the
        client found); they produce nothing more and their blocks are free at once."""
        request_ids = list(request_ids)
        for request_id in request_ids:
            entry = self._compiling.pop(request_id, None)
            if entry is not None and all(f is not entry[1] for _, f, _ in self._compiling.values()):
                entry[1].cancel()  # nobody waits for it: a compile not yet started never runs
        self.scheduler.finish_requests(request_ids, status)

    def has_unfinished_requests(self) -> bool:
        """True while a request is unfinished or a step's tokens are still to be read."""
        return (
            self.scheduler.has_unfinished_requests()
            or self._in_flight is not None
            or bool(self._compiling)
        )

    def step(self) -> list[EngineCoreOutput]:
        """Advance the engine by one step; returns the tokens that became known.

        One path for both orders: plan and launch a step, then finish the step launched
        before it, if any. In the plain order (no async scheduling, or a request that needs
        exact token history) nothing is left in flight: a step still in flight from the
        asynchronous order is finished first, and the new step is finished at once."""
        failed = self._admit_compiled()
        exact = not self.async_scheduling or self.scheduler.needs_exact_history()
        if exact and self._in_flight is not None:
            return failed + self._finish_in_flight()
        timer = self.host_timer
        with timer.phase("core.schedule"):
            scheduled = self.scheduler.schedule()
            self._mark_grammar_rows(scheduled)
        launched = None
        if not scheduled.is_empty or scheduled.finished_request_ids:
            with timer.phase("core.launch"):
                launched = (scheduled, self.executor.execute_model_async(scheduled))
        outputs = self._finish_in_flight() if self._in_flight is not None else []
        if launched is not None and isinstance(launched[1], PendingSample):
            with timer.phase("core.grammar_bitmask"):
                launched = (scheduled, self._sample_with_grammars(scheduled, launched[1]))
        self._in_flight = launched
        if exact and self._in_flight is not None:
            outputs = self._finish_in_flight()
        if self._grammar_failures:
            failed, self._grammar_failures = failed + self._grammar_failures, []
        return failed + outputs

    def _admit_compiled(self) -> list[EngineCoreOutput]:
        """Hand the requests whose grammar compiled to the scheduler (in arrival order);
        fail those whose grammar could not compile. With nothing else to run, wait a
        little for a compile to end rather than spin."""
        if not self._compiling:
            return []
        if not self.scheduler.has_unfinished_requests() and self._in_flight is None:
            wait([f for _, f, _ in self._compiling.values()], GRAMMAR_POLL_S, FIRST_COMPLETED)
        outputs = []
        now = time.monotonic()
        for request_id, (request, future, since) in list(self._compiling.items()):
            if not future.done():
                if now - since > COMPILE_TIMEOUT_S:
                    del self._compiling[request_id]
                    message = f"its grammar did not compile within {COMPILE_TIMEOUT_S:.0f} s"
                    outputs.append(grammar_failed(request, message))
                continue
            del self._compiling[request_id]
            try:
                request.grammar = RequestGrammar(future.result(), tuple(request.eos_token_ids))
            except Exception as error:
                logger.warning("the grammar of %s did not compile: %s", request_id, error)
                outputs.append(grammar_failed(request, f"its grammar did not compile: {error}"))
                continue
            self.scheduler.add_request(request)
        return outputs

    def _mark_grammar_rows(self, scheduled: SchedulerOutput) -> None:
        requests = self.scheduler.requests
        rows = frozenset(
            r for r in scheduled.sampling_request_ids if requests[r].grammar is not None
        )
        if rows:
            scheduled.grammar_request_ids = rows

    def _sample_with_grammars(self, scheduled: SchedulerOutput, pending: PendingSample):
        """Sample the launched step once its grammar rows are known: the tokens of the step
        before were taken (and fed to the grammars) just now. Rows of requests without a
        grammar, or that finished meanwhile (their token is dropped), allow every token."""
        requests = self.scheduler.requests
        grammar_rows = scheduled.grammar_request_ids
        grammars = [
            getattr(requests.get(r), "grammar", None) if r in grammar_rows else None
            for r in scheduled.sampling_request_ids
        ]
        bitmask, failed = self.grammars.fill_bitmask(grammars)
        result = pending.sample(bitmask)
        if failed:
            ids = scheduled.sampling_request_ids
            self._grammar_failures.extend(
                self.scheduler.fail_requests(
                    {ids[row]: reason for row, reason in failed.items() if ids[row] in requests}
                )
            )
        return result

    def _finish_in_flight(self) -> list[EngineCoreOutput]:
        scheduled, result = self._in_flight
        self._in_flight = None
        with self.host_timer.phase("core.wait_for_device"):
            runner_output = result.result()
        with self.host_timer.phase("core.update"):
            return self.scheduler.update_from_output(scheduled, runner_output)

    def host_timings(self) -> list[dict[str, dict[str, float]]]:
        """Per rank (rank 0 first), host time by phase; empty phases unless
        METROLINE_HOST_TIMING=1 (see :mod:`metroline.engine.host_timing`)."""
        ranks = self.executor.host_timings()
        ranks[0] = merge_reports(self.host_timer.report(), ranks[0])
        return ranks

    def stats(self) -> SchedulerStats:
        """The scheduler's figures; requests whose grammar compiles count as waiting."""
        stats = self.scheduler.stats()
        if self._compiling:
            stats = dataclasses.replace(stats, num_waiting=stats.num_waiting + len(self._compiling))
        return stats

    def running_request_ids(self) -> list[str]:
        """Requests scheduled in the last step and still running (for queue-time metrics)."""
        return [request.request_id for request in self.scheduler.running]

    def shutdown(self) -> None:
        self.grammars.shutdown()
        self.executor.shutdown()


#: Seconds an otherwise idle core waits for a grammar to compile before looking at its
#: messages again.
GRAMMAR_POLL_S = 0.01
#: Most requests that may wait for their grammar to compile at once.
MAX_COMPILING_REQUESTS = 1024
#: Seconds a request may wait for its grammar to compile before it is failed.
COMPILE_TIMEOUT_S = 60.0


def grammar_failed(request: Request, message: str) -> EngineCoreOutput:
    """The output of a request that ends before it was scheduled."""
    return EngineCoreOutput(
        request_id=request.request_id,
        new_token_ids=[],
        finish_reason=RequestStatus.FINISHED_ERROR.value,
        error=message,
    )


def use_async_scheduling(wanted: bool | None, device_type: str, speculative: bool = False) -> bool:
    """Whether the core keeps a step in flight. Unset means on for CUDA (the measurements
    are in docs/engine.md, "Asynchronous scheduling"); on the CPU the model runs inline, so
    there is nothing to overlap. Speculative decoding proposes from the tokens the last step
    accepted, so it runs in the plain order (EngineConfig refuses asking for both)."""
    if wanted is None:
        wanted = device_type == "cuda"
        if wanted and speculative:
            logger.info("speculative decoding runs steps in the plain order (no async scheduling)")
            return False
    return wanted
