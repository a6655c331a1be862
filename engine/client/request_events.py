"""What the engine client reports about requests and steps, for metrics and logs."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..messages import SchedulerStats


@dataclass(slots=True)
class FinishedRequest:
    """One user request at its end (finished, stopped or aborted). Times are
    ``time.monotonic()`` values; ``None`` where the request never got that far."""

    request_id: str
    num_prompt_tokens: int
    num_output_tokens: int
    #: One per sequence: "stop", "length", "abort" or "error".
    finish_reasons: list[str]
    arrival_time: float
    scheduled_time: float | None
    first_token_time: float | None
    last_token_time: float | None
    finished_time: float
    #: Engine steps that produced tokens for this request.
    num_token_steps: int

    @property
    def finish_reason(self) -> str:
        """The request's reason: "error" if any sequence failed, else "abort" if any was
        aborted, else the first's."""
        for reason in ("error", "abort"):
            if reason in self.finish_reasons:
                return reason
        return self.finish_reasons[0]

    @property
    def ttft(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float:
        return self.finished_time - self.arrival_time

    @property
    def queue_time(self) -> float | None:
        if self.scheduled_time is None:
            return None
        return max(0.0, self.scheduled_time - self.arrival_time)

    @property
    def prefill_time(self) -> float | None:
        """First scheduled to first token (vLLM's prefill interval)."""
        if self.scheduled_time is None or self.first_token_time is None:
            return None
        return max(0.0, self.first_token_time - self.scheduled_time)

    @property
    def decode_time(self) -> float | None:
        """First token to last token (vLLM's decode interval)."""
        if self.first_token_time is None or self.last_token_time is None:
            return None
        return self.last_token_time - self.first_token_time

    @property
    def inference_time(self) -> float | None:
        """First scheduled to last token (vLLM's inference interval: prefill plus decode)."""
        if self.scheduled_time is None or self.last_token_time is None:
            return None
        return max(0.0, self.last_token_time - self.scheduled_time)

    @property
    def mean_time_per_output_token(self) -> float | None:
        """The decode interval over the token steps after the first, 0 with one step (vLLM's
        ``request_time_per_output_token_seconds``); None without a token."""
        decode = self.decode_time
        if decode is None:
            return None
        return decode / (self.num_token_steps - 1) if self.num_token_steps > 1 else 0.0

    @property
    def time_per_output_token(self) -> float | None:
        """Mean time between token-producing steps after the first token."""
        if self.first_token_time is None or self.last_token_time is None:
            return None
        if self.num_token_steps < 2:
            return None
        return (self.last_token_time - self.first_token_time) / (self.num_token_steps - 1)


@dataclass(slots=True)
class IterationStats:
    """What one core step brought the requests (vLLM's iteration stats): tokens generated,
    the prompt lengths of the requests whose first token it produced, and one inter-token
    latency per request that got a token after its first (seconds since that request's
    previous token-producing step)."""

    num_generation_tokens: int = 0
    num_prompt_tokens: int = 0
    inter_token_latencies: list[float] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        """The step's tokens as vLLM's ``iteration_tokens_total`` counts them."""
        return self.num_prompt_tokens + self.num_generation_tokens


class EngineObserver:
    """Hooks the engine client calls on the event loop; the default does nothing."""

    def on_step(self, stats: SchedulerStats, iteration: IterationStats) -> None:
        """After every core step (and after aborts are applied)."""

    def on_request_finished(self, request: FinishedRequest) -> None:
        """Once per user request, whatever ended it."""
