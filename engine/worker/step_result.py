"""What a step's execution hands back to the scheduler."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..messages import ModelRunnerOutput
from ..outputs import PositionLogprobs


class StepResult:
    """A launched step's sampled tokens. On CUDA they are copied to pinned host memory as
    soon as they are sampled (before any later step's work), and :meth:`result` waits for
    that copy only, not for steps launched after this one."""

    def __init__(
        self,
        request_ids: list[str],
        tokens: Any | None,  # [num_sampled] int64 tensor (device), a list, or None
        logprobs: dict[str, PositionLogprobs],
        failed: dict[str, str] | None = None,
        unwritten: frozenset[str] = frozenset(),
        prompt_logprobs: dict[str, tuple[int, list[PositionLogprobs]]] | None = None,
        spec_token_ids: dict[str, list[int]] | None = None,
        spec_logprobs: dict[str, list[PositionLogprobs]] | None = None,
    ) -> None:
        self.request_ids = request_ids
        #: As in ModelRunnerOutput (already on the host).
        self.spec_token_ids = spec_token_ids or {}
        self.spec_logprobs = spec_logprobs or {}
        self.logprobs = logprobs
        #: As in ModelRunnerOutput (already on the host).
        self.prompt_logprobs = prompt_logprobs or {}
        #: Request id -> why the step failed it (its row of ``tokens`` is a placeholder).
        self.failed = failed or {}
        #: The failed requests the step ran without (see ModelRunnerOutput).
        self.unwritten = unwritten
        self._ready: Any | None = None
        if tokens is not None and not isinstance(tokens, list) and tokens.is_cuda:
            import torch

            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
            tokens = host
        self._tokens = tokens

    @classmethod
    def empty(
        cls,
        is_driver: bool = True,
        failed: dict[str, str] | None = None,
        unwritten: frozenset[str] = frozenset(),
        prompt_logprobs: dict[str, tuple[int, list[PositionLogprobs]]] | None = None,
    ) -> StepResult:
        """A step that sampled nothing (``result()`` is None on non-driver ranks)."""
        return cls([], [] if is_driver else None, {}, failed, unwritten, prompt_logprobs)

    def result(self) -> ModelRunnerOutput | None:
        if self._tokens is None:
            return None
        if self._ready is not None:
            self._ready.synchronize()
        tokens = self._tokens if isinstance(self._tokens, list) else self._tokens.tolist()
        sampled = {r: t for r, t in zip(self.request_ids, tokens) if r not in self.failed}
        return ModelRunnerOutput(
            sampled,
            self.logprobs,
            self.failed,
            self.unwritten,
            self.prompt_logprobs,
            {r: t for r, t in self.spec_token_ids.items() if r not in self.failed},
            {r: e for r, e in self.spec_logprobs.items() if r not in self.failed},
        )


class PendingSample:
    """A launched step whose forward pass is queued but whose sampling waits for the
    grammar bitmask of its structured-output requests (driver only). :meth:`sample` must be
    called once, before the next step is launched; it launches the sampling and returns the
    step's :class:`StepResult`."""

    def __init__(self, sample: Callable[[Any], StepResult]) -> None:
        self._sample: Callable[[Any], StepResult] | None = sample

    def sample(self, bitmask: Any) -> StepResult:
        """``bitmask``: int32 ``[len(sampling_request_ids), ceil(vocab / 32)]`` on the host,
        one row per request the plan samples, in its order; bit ``t`` of a row set when
        token ``t`` is allowed (all set: unconstrained)."""
        sample, self._sample = self._sample, None
        if sample is None:
            raise RuntimeError("a step's sampling was launched twice")
        return sample(bitmask)
