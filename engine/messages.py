"""Everything that crosses a process boundary, as plain picklable data.

Three kinds of traffic, one section each:

- API server -> engine core: :class:`AddRequests` (holding :class:`EngineCoreRequest`),
  :class:`FinishRequests`, :class:`Shutdown`;
- engine core -> API server: :class:`CoreReady`, :class:`CoreStep` (holding
  :class:`EngineCoreOutput` and :class:`SchedulerStats`), :class:`CoreFailed`;
- engine core -> workers, and back: the step plan :class:`SchedulerOutput` (requests new to
  the workers sent whole as :class:`NewRequestData`, requests they already hold as
  :class:`RunningRequestData` diffs), and :class:`ModelRunnerOutput`.

Nothing here imports a process's code: each side imports this module and nothing of the
other side.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from .outputs import PositionLogprobs
from .sampling_params import SamplingParams

# ---- request identity and state (every process) ----------------------------------------


#: The error of a request left with no token it may generate next: its structured output
#: allowed none that its other constraints (allowed_token_ids, bad_words, min_tokens,
#: logit_bias bans) let through. The request's own fault, answered as a bad request.
NO_ALLOWED_TOKEN = (
    "no token meets all of the request's constraints (its structured output, "
    "allowed_token_ids, bad_words, min_tokens or logit_bias)"
)
#: Host seconds one request's grammar may take to fill its bitmask row or take a token in
#: one step (core/grammars.py): a grammar whose cost grows with the output (an ambiguous
#: one) must not slow every other request's steps.
GRAMMAR_STEP_BUDGET_S = 0.05
#: The error of a request whose grammar ran over that budget: the request's own fault.
GRAMMAR_TOO_COSTLY = (
    f"its grammar took more than {GRAMMAR_STEP_BUDGET_S * 1e3:.0f} ms of a step to follow; "
    "simplify it (an ambiguous grammar costs more with every token)"
)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    #: An exception while serving this request alone (its inputs, sampling, detokenising).
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
    RequestStatus.FINISHED_ERROR,
}


@dataclass
class EngineCoreRequest:
    """What a client hands the engine core: already tokenised and validated."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)
    #: Mixed into the first block's hash: requests with different salts never share blocks.
    #: ``None`` with prefix caching off means "do not hash this request's blocks at all".
    cache_salt: str | None = None
    #: ``sampling_params.bad_words`` as token ids (each word with and without a leading
    #: space): a sequence's last id is banned while the others end the output.
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()


# ---- API server -> engine core ------------------------------------------------------------


@dataclass
class AddRequests:
    """The core requests of one user request (``n`` siblings): all are taken, or none."""

    request_id: str
    core_requests: list[EngineCoreRequest]


@dataclass
class FinishRequests:
    """End core requests from outside: aborts (client gone) or stop strings found by the
    server's detokeniser. Their KV blocks are free before the next step."""

    core_request_ids: list[str]
    status: RequestStatus = RequestStatus.FINISHED_ABORTED


@dataclass
class Shutdown:
    pass


# ---- engine core -> API server ------------------------------------------------------------


@dataclass(slots=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    #: Steps planned so far, and those in which some request computes more than one token
    #: (a prompt chunk): the rest are pure decode steps, the ones CUDA graphs replay.
    num_steps: int = 0
    num_prefill_steps: int = 0
    num_scheduled_tokens: int = 0
    #: Speculative decoding, since the engine started: request-steps that verified drafts,
    #: draft tokens verified, drafts accepted, and accepted drafts by position (0 first).
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_position: tuple[int, ...] = ()


@dataclass(slots=True)
class EngineCoreOutput:
    """Tokens a request gained in one engine step (and why it finished, if it did)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    #: Why serving this request failed (with finish_reason "error").
    error: str | None = None
    #: With ``prompt_logprobs``, on the request's first output: one entry per prompt token
    #: (None for the first, which nothing predicts).
    prompt_logprobs: list[PositionLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class CoreReady:
    """The core has loaded the model and sized its KV pool."""

    num_blocks: int


@dataclass
class CoreStep:
    outputs: list[EngineCoreOutput]
    stats: SchedulerStats
    #: Core request id -> monotonic time it was first scheduled (for queue-time metrics).
    scheduled: dict[str, float] = field(default_factory=dict)
    #: (user request id, reason) for requests the core refused to add.
    rejected: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class CoreFailed:
    message: str


# ---- engine core -> workers -----------------------------------------------------------------


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
    #: As in :class:`EngineCoreRequest`.
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()


@dataclass(slots=True)
class RunningRequestData:
    """A request the workers already hold (scheduled in an earlier step and not preempted
    since): only what changed."""

    request_id: str
    #: Tokens appended since the workers last saw the request (sampled last step).
    new_token_ids: list[int]
    new_block_ids: list[int]
    #: Tokens computed before this step: this step computes the ones that follow. The last
    #: of them may not be in the workers' token list yet (sampled by the step in flight).
    num_computed_tokens: int
    #: After speculative decoding trimmed the request's blocks: how many of its block ids
    #: the workers keep before appending ``new_block_ids`` (-1: all of them).
    num_kept_blocks: int = -1


@dataclass
class SchedulerOutput:
    """Invariant: every scheduled request appears exactly once, in ``new_requests`` or
    ``running_requests``, and ``num_scheduled_tokens`` holds its token count (> 0)."""

    new_requests: list[NewRequestData] = field(default_factory=list)
    running_requests: list[RunningRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    #: Requests finished or aborted since the last step: workers drop their state.
    finished_request_ids: set[str] = field(default_factory=set)
    #: Requests preempted this step: workers drop their state (they return as new).
    preempted_request_ids: set[str] = field(default_factory=set)
    #: Requests whose last scheduled token ends their known tokens: the step samples one
    #: token for each, in this order.
    sampling_request_ids: list[str] = field(default_factory=list)
    #: The sampling requests whose output follows a grammar: the driver samples them only
    #: after the core hands it their bitmask rows (see ``PendingSample``).
    grammar_request_ids: frozenset[str] = frozenset()
    #: Speculative decoding: draft tokens per sampling request that has any. Such a request's
    #: scheduled tokens are its next token then these drafts; the step verifies them and
    #: returns the accepted ones plus one token of the target's.
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)

    def without(self, request_ids: set[str] | dict[str, str]) -> SchedulerOutput:
        """This plan less some requests (whose inputs could not be built); every rank drops
        the same ones, so their batches stay alike."""
        return SchedulerOutput(
            new_requests=[r for r in self.new_requests if r.request_id not in request_ids],
            running_requests=[r for r in self.running_requests if r.request_id not in request_ids],
            num_scheduled_tokens={
                r: n for r, n in self.num_scheduled_tokens.items() if r not in request_ids
            },
            finished_request_ids=self.finished_request_ids,
            preempted_request_ids=self.preempted_request_ids,
            sampling_request_ids=[r for r in self.sampling_request_ids if r not in request_ids],
            grammar_request_ids=self.grammar_request_ids.difference(request_ids),
            spec_token_ids={
                r: d for r, d in self.spec_token_ids.items() if r not in request_ids
            },
        )

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


# ---- workers -> engine core -----------------------------------------------------------------


@dataclass(slots=True)
class ModelRunnerOutput:
    """Tokens sampled in one step, for the requests that finished their known tokens, and
    the requests the step failed (building their inputs, or sampling) with the reason.
    A failed request has no token here."""

    sampled_token_ids: dict[str, int]
    logprobs: dict[str, PositionLogprobs]
    failed: dict[str, str] = field(default_factory=dict)
    #: Failed requests that the step ran without (their inputs failed): it wrote no KV for
    #: them, so blocks they were given for it hold nothing.
    unwritten: frozenset[str] = frozenset()
    #: Request id -> (index of the first prompt token covered, one entry per prompt token
    #: from there), for the requests with ``prompt_logprobs`` whose prompt the step computed.
    prompt_logprobs: dict[str, tuple[int, list[PositionLogprobs]]] = field(default_factory=dict)
    #: Requests that verified drafts: every token the step emitted for them (the accepted
    #: drafts, then the target's own), in order; ``sampled_token_ids`` holds the first. With
    #: ``logprobs``, one entry per emitted token in ``spec_logprobs``.
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    spec_logprobs: dict[str, list[PositionLogprobs]] = field(default_factory=dict)
