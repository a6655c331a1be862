"""Executors run each step on every tensor-parallel rank.

- :class:`UniprocExecutor`: TP=1, one worker in this process.
- :class:`MultiprocExecutor`: TP=N, rank 0 in this process (it samples) and N-1 worker
  processes. Each step's plan is pickled once and sent to every worker; all ranks run the
  forward pass together (NCCL on CUDA, gloo on CPU). Workers never outlive this process.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import pickle
import time
import weakref
from typing import Any

from ..children import Child, spawn_child
from ..config import EngineConfig
from ..distributed import create_store, destroy_distributed, init_distributed
from ..messages import SchedulerOutput
from .process import limit_cpu_threads
from .step_result import StepResult
from .worker import Worker

logger = logging.getLogger(__name__)

#: A worker process's entry (see :func:`~metroline.engine.children.spawn_child`).
WORKER_ENTRY = "metroline.engine.worker.process:worker_main"

#: Seconds a worker gets to exit after "shutdown" before it is killed.
SHUTDOWN_GRACE = 10.0
#: Seconds a spawned worker may take to import its modules and report in.
START_TIMEOUT_S = 300.0


class UniprocExecutor:
    """Rank 0 alone, in this process."""

    def __init__(self, config: EngineConfig) -> None:
        self.worker = Worker(config)

    def execute_model_async(self, scheduled: SchedulerOutput) -> StepResult:
        return self.worker.execute_model_async(scheduled)

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def initialize_cache(self, num_blocks: int) -> None:
        self.worker.initialize_cache(num_blocks)

    def load_reports(self) -> list[dict[str, float]]:
        return [self.worker.get_load_report()]

    def host_timings(self) -> list[dict[str, dict[str, float]]]:
        return [self.worker.get_host_timing()]

    def shutdown(self) -> None:
        """Free the device memory now (the engine object may live on). Idempotent."""
        self.worker.shutdown()


class WorkerFailedError(RuntimeError):
    """A tensor-parallel worker process failed; the engine cannot continue."""


class MultiprocExecutor:
    """Rank 0 in this process, ranks 1..N-1 in worker processes. With asynchronous
    scheduling every rank receives each step's sampled tokens by a device-side broadcast
    from rank 0 (see ModelRunner), so plans may run ahead of the tokens."""

    def __init__(self, config: EngineConfig) -> None:
        world_size = config.parallel.tensor_parallel_size
        backend = "nccl" if config.device.type == "cuda" else "gloo"
        if backend == "nccl":
            import torch

            if torch.cuda.device_count() < world_size:
                raise ValueError(
                    f"tensor_parallel_size={world_size} needs {world_size} GPUs; "
                    f"{torch.cuda.device_count()} visible"
                )
        store, port = create_store(world_size)
        self.workers: list[Child] = []
        self._closed = False
        try:
            for rank in range(1, world_size):
                self.workers.append(
                    spawn_child(
                        WORKER_ENTRY,
                        (rank, world_size, backend, port, config),
                        name=f"metroline-tp{rank}",
                        daemon=True,
                    )
                )
            self._wait_until_started()
            if backend == "gloo":
                limit_cpu_threads(world_size)
            init_distributed(0, world_size, backend, port, store=store)
            self.worker = Worker(config, rank=0)
            self._collect()
        except BaseException:
            self.shutdown()
            raise
        # Workers watch this process and die with it; at a normal exit stop them cleanly.
        ref = weakref.ref(self)
        atexit.register(lambda: (executor := ref()) is not None and executor.shutdown())

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.shutdown()

    def _wait_until_started(self) -> None:
        """Every worker reports in before rank 0 joins the group, so a worker that dies
        while starting (an import error, a bad environment) fails the engine at once rather
        than leaving rank 0 in the rendezvous until the collective timeout."""
        deadline = time.monotonic() + START_TIMEOUT_S
        pending = dict(enumerate(self.workers, start=1))
        while pending:
            for rank, handle in list(pending.items()):
                if handle.from_child.poll(0.05):
                    try:
                        status, value = handle.from_child.recv()
                    except EOFError:
                        status, value = "exited", None
                    if status == "started":
                        del pending[rank]
                        continue
                    if status == "error":
                        raise WorkerFailedError(f"tensor-parallel worker {rank} failed:\n{value}")
                if not handle.process.is_alive():
                    handle.process.join()
                    raise WorkerFailedError(
                        f"tensor-parallel worker {rank} exited while starting (code "
                        f"{handle.process.exitcode}); its error is in the log above"
                    )
            if pending and time.monotonic() > deadline:
                raise WorkerFailedError(
                    f"tensor-parallel workers {sorted(pending)} did not start in "
                    f"{START_TIMEOUT_S:.0f} s"
                )

    def _broadcast(self, method: str, *args: Any) -> None:
        payload = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        for handle in self.workers:
            handle.to_child.send_bytes(payload)

    def _collect(self) -> list[Any]:
        values = []
        for rank, handle in enumerate(self.workers, start=1):
            try:
                status, value = handle.from_child.recv()
            except EOFError:
                raise WorkerFailedError(
                    f"tensor-parallel worker {rank} exited (code {handle.process.exitcode})"
                ) from None
            if status != "ok":
                raise WorkerFailedError(f"tensor-parallel worker {rank} failed:\n{value}")
            values.append(value)
        return values

    def _check_workers(self) -> None:
        for rank, handle in enumerate(self.workers, start=1):
            if handle.from_child.poll():
                _status, value = handle.from_child.recv()
                raise WorkerFailedError(f"tensor-parallel worker {rank} failed:\n{value}")
            if not handle.process.is_alive():
                raise WorkerFailedError(
                    f"tensor-parallel worker {rank} exited (code {handle.process.exitcode})"
                )

    def determine_num_blocks(self) -> int:
        """The smallest pool any rank can hold (every rank holds the same block ids)."""
        self._broadcast("determine_num_blocks")
        local = self.worker.determine_num_blocks()
        return min([local, *self._collect()])

    def initialize_cache(self, num_blocks: int) -> None:
        self._broadcast("initialize_cache", num_blocks)
        self.worker.initialize_cache(num_blocks)
        self._collect()

    def load_reports(self) -> list[dict[str, float]]:
        """Every rank's loading report, rank 0 first."""
        self._broadcast("get_load_report")
        local = self.worker.get_load_report()
        return [local, *self._collect()]

    def host_timings(self) -> list[dict[str, dict[str, float]]]:
        """Every rank's host time by phase, rank 0 first (see engine/host_timing.py)."""
        self._broadcast("get_host_timing")
        local = self.worker.get_host_timing()
        return [local, *self._collect()]

    def execute_model_async(self, scheduled: SchedulerOutput) -> StepResult:
        """Send the plan to every worker, launch rank 0's part, return without waiting."""
        self._check_workers()
        self._broadcast("execute_model_async", scheduled)
        return self.worker.execute_model_async(scheduled)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for handle in self.workers:
            with contextlib.suppress(OSError):
                handle.to_child.send_bytes(pickle.dumps(("shutdown", ())))
        # Tear the group down on every rank at once: NCCL's teardown waits for the peers, so
        # rank 0 must not wait for the workers to exit first. Graphs holding captured
        # collectives go before the communicator does.
        # Absent when start-up failed before rank 0's worker existed.
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.shutdown()
        self.worker = None
        destroy_distributed()
        for handle in self.workers:
            handle.process.join(SHUTDOWN_GRACE)
            if handle.process.is_alive():
                handle.process.kill()
                handle.process.join()
            handle.close_pipes()


def create_executor(config: EngineConfig) -> UniprocExecutor | MultiprocExecutor:
    if config.parallel.tensor_parallel_size == 1:
        return UniprocExecutor(config)
    return MultiprocExecutor(config)
