"""Executors run each step on every worker. TP=1: one worker in this process."""

from __future__ import annotations

from metroline.engine.config import EngineConfig
from metroline.engine.scheduler import ModelRunnerOutput
from metroline.engine.scheduler_output import SchedulerOutput
from metroline.engine.worker import Worker


class UniprocExecutor:
    def __init__(self, config: EngineConfig) -> None:
        if config.parallel.tensor_parallel_size != 1:
            raise ValueError(
                "tensor_parallel_size > 1 needs the multi-process executor, which this build "
                "does not include yet; use tensor_parallel_size=1"
            )
        self.worker = Worker(config)

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def initialize_cache(self, num_blocks: int) -> None:
        self.worker.initialize_cache(num_blocks)

    def execute_model(self, scheduled: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(scheduled)

    def shutdown(self) -> None:
        pass


def create_executor(config: EngineConfig) -> UniprocExecutor:
    return UniprocExecutor(config)
