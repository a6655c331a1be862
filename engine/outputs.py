"""What the engine hands back: per-step core outputs and user-facing request outputs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Logprob:
    """Log-probability of one token under the model's raw distribution (before sampling
    transforms), its 1-based rank in that distribution, and its text when known."""

    logprob: float
    rank: int
    decoded_token: str | None = None


#: One position's log-probabilities: the sampled token and the top ``k`` alternatives.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    """One generated sequence of a request (``n`` of them per request)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    #: The stop string or stop token id that ended the sequence, if any.
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one user request: its prompt and its ``n`` completions."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    #: With ``prompt_logprobs``: one entry per prompt token, None for the first (nothing
    #: predicts it), each holding that token and the top alternatives.
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    #: Set when serving the request failed: one sequence finished with reason "error" and
    #: its siblings were aborted. Other requests are not affected.
    error: str | None = None
