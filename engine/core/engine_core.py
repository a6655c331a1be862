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
from collections.abc import Iterable

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
from ..worker.step_result import StepResult
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
        self.async_scheduling = use_async_scheduling(config.async_scheduling, config.device.type)
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
        self.scheduler = Scheduler(config.scheduler, self.kv_cache_manager)
        self._in_flight: tuple[SchedulerOutput, StepResult] | None = None
        self.host_timer = HostTimer()

    def add_request(self, spec: EngineCoreRequest) -> None:
        validate_request(spec, self.config)
        self.scheduler.add_request(Request(spec))

    def finish_requests(
        self,
        request_ids: Iterable[str],
        status: RequestStatus = RequestStatus.FINISHED_ABORTED,
    ) -> None:
        """End requests from outside (aborted by default, or stopped by a stop string the
        client found); they produce nothing more and their blocks are free at once."""
        self.scheduler.finish_requests(request_ids, status)

    def has_unfinished_requests(self) -> bool:
        """True while a request is unfinished or a step's tokens are still to be read."""
        return self.scheduler.has_unfinished_requests() or self._in_flight is not None

    def step(self) -> list[EngineCoreOutput]:
        """Advance the engine by one step; returns the tokens that became known.

        One path for both orders: plan and launch a step, then finish the step launched
        before it, if any. In the plain order (no async scheduling, or a request that needs
        exact token history) nothing is left in flight: a step still in flight from the
        asynchronous order is finished first, and the new step is finished at once."""
        exact = not self.async_scheduling or self.scheduler.needs_exact_history()
        if exact and self._in_flight is not None:
            return self._finish_in_flight()
        timer = self.host_timer
        with timer.phase("core.schedule"):
            scheduled = self.scheduler.schedule()
        launched = None
        if not scheduled.is_empty or scheduled.finished_request_ids:
            with timer.phase("core.launch"):
                launched = (scheduled, self.executor.execute_model_async(scheduled))
        outputs = self._finish_in_flight() if self._in_flight is not None else []
        self._in_flight = launched
        if exact and self._in_flight is not None:
            outputs = self._finish_in_flight()
        return outputs

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
        return self.scheduler.stats()

    def running_request_ids(self) -> list[str]:
        """Requests scheduled in the last step and still running (for queue-time metrics)."""
        return [request.request_id for request in self.scheduler.running]

    def shutdown(self) -> None:
        self.executor.shutdown()


def use_async_scheduling(wanted: bool | None, device_type: str) -> bool:
    """Whether the core keeps a step in flight. Unset means on for CUDA (the measurements
    are in docs/engine.md, "Asynchronous scheduling"); on the CPU the model runs inline, so
    there is nothing to overlap."""
    if wanted is None:
        return device_type == "cuda"
    return wanted
