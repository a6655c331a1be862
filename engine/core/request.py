"""A request as the engine core sees it: token ids in, token ids out."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..messages import EngineCoreRequest, RequestStatus
from ..outputs import PositionLogprobs

if TYPE_CHECKING:
    from .grammars import RequestGrammar


class Request:
    """Scheduler-side state of one sequence.

    Invariants: ``all_token_ids == prompt_token_ids + output_token_ids``;
    ``0 <= num_computed_tokens <= num_tokens + num_pending_samples`` (plus the step's draft
    tokens while a speculative step is in flight); the blocks the KV cache manager holds for
    this request have a slot for each of the first ``num_computed_tokens``.
    """

    __slots__ = (
        "all_token_ids",
        "arrival_time",
        "bad_words_token_ids",
        "block_hashes",
        "cache_salt",
        "eos_token_ids",
        "grammar",
        "num_cached_tokens",
        "num_computed_tokens",
        "num_pending_samples",
        "num_preemptions",
        "num_prompt_tokens",
        "output_token_ids",
        "prompt_logprobs",
        "prompt_token_ids",
        "request_id",
        "sampling_params",
        "status",
        "stop_reason",
    )

    def __init__(self, spec: EngineCoreRequest) -> None:
        self.request_id = spec.request_id
        self.prompt_token_ids = list(spec.prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.sampling_params = spec.sampling_params
        self.eos_token_ids = frozenset(spec.eos_token_ids)
        self.arrival_time = spec.arrival_time
        self.cache_salt = spec.cache_salt
        self.bad_words_token_ids = spec.bad_words_token_ids
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.status = RequestStatus.WAITING
        #: Tokens scheduled for computation so far (their KV is written once the steps that
        #: scheduled them have run).
        self.num_computed_tokens = 0
        #: Tokens that steps already launched will sample for this request (0 or 1; the
        #: engine keeps at most one step in flight). Their values are not known yet.
        self.num_pending_samples = 0
        #: Prefix-cache hit length the first time the request was scheduled (-1: not yet).
        self.num_cached_tokens = -1
        self.num_preemptions = 0
        self.block_hashes: list[bytes] = []
        self.stop_reason: int | str | None = None
        #: With structured outputs: the request's matcher (set once its grammar compiled,
        #: before the scheduler sees the request); it has accepted every output token.
        self.grammar: RequestGrammar | None = None
        #: With ``prompt_logprobs``: the entries gathered so far, one per prompt token from
        #: the first (None); handed to the first output, then None.
        self.prompt_logprobs: list[PositionLogprobs | None] | None = (
            [None] if spec.sampling_params.prompt_logprobs is not None else None
        )

    @property
    def reads_prefix_cache(self) -> bool:
        """A request with ``prompt_logprobs`` computes its whole prompt (no cache hits)."""
        return self.sampling_params.prompt_logprobs is None

    def add_prompt_logprobs(self, first: int, entries: list[PositionLogprobs]) -> None:
        """Take the entries of prompt tokens ``first, first + 1, ...``; tokens already held
        (computed again after a preemption) are skipped."""
        held = self.prompt_logprobs
        if held is not None and first <= len(held):
            held.extend(entries[len(held) - first :])

    @property
    def needs_exact_history(self) -> bool:
        """Sampling reads the full token history (penalties, min_tokens, bad words of
        several tokens): steps must not run ahead of the tokens read back."""
        params = self.sampling_params
        return (
            params.uses_penalties
            or params.min_tokens > 0
            or any(len(word) > 1 for word in self.bad_words_token_ids)
        )

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens})"
        )
