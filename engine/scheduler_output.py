"""The plan of one engine step, as plain data: what every worker needs to run it.

New (and resumed-after-preemption) requests are sent whole; requests the workers already
know are sent as diffs (new blocks, new tokens). Only this crosses to worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from metroline.engine.sampling_params import SamplingParams


@dataclass(slots=True)
class NewRequestData:
    request_id: str
    #: Prompt plus any output already generated (a request resumed after preemption).
    token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    #: Output tokens already generated before this (re)start; counted by penalties.
    num_output_tokens: int = 0
    #: End-of-sequence ids, banned by ``min_tokens`` until enough tokens are generated.
    eos_token_ids: tuple[int, ...] = ()


@dataclass(slots=True)
class CachedRequestData:
    request_id: str
    #: Tokens appended since the workers last saw the request (sampled last step).
    new_token_ids: list[int]
    new_block_ids: list[int]
    #: Tokens computed before this step: this step computes the ones that follow. The last
    #: of them may not be in the workers' token list yet (sampled by the step in flight).
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    """Invariant: every scheduled request appears exactly once, in ``new_requests`` or
    ``cached_requests``, and ``num_scheduled_tokens`` holds its token count (> 0)."""

    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    #: Requests finished or aborted since the last step: workers drop their state.
    finished_request_ids: set[str] = field(default_factory=set)
    #: Requests preempted this step: workers drop their state (they return as new).
    preempted_request_ids: set[str] = field(default_factory=set)
    #: Requests whose last scheduled token ends their known tokens: the step samples one
    #: token for each, in this order.
    sampling_request_ids: list[str] = field(default_factory=list)

    def without(self, request_ids: set[str] | dict[str, str]) -> SchedulerOutput:
        """This plan less some requests (whose inputs could not be built); every rank drops
        the same ones, so their batches stay alike."""
        return SchedulerOutput(
            new_requests=[r for r in self.new_requests if r.request_id not in request_ids],
            cached_requests=[r for r in self.cached_requests if r.request_id not in request_ids],
            num_scheduled_tokens={
                r: n for r, n in self.num_scheduled_tokens.items() if r not in request_ids
            },
            finished_request_ids=self.finished_request_ids,
            preempted_request_ids=self.preempted_request_ids,
            sampling_request_ids=[r for r in self.sampling_request_ids if r not in request_ids],
        )

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens
