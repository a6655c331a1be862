"""Turns engine-core token outputs into user-facing :class:`RequestOutput` objects.

Detokenises incrementally, ends sequences on stop strings (telling the caller which core
requests to finish), and gathers the ``n`` sequences of a request into one output.

A request fails alone: when one of its sequences finishes with an error in the core, or
processing one of its outputs here raises, the request ends at once with ``error`` set,
its other sequences are aborted (the caller tells the core), and other requests go on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from .. import faults
from ..messages import EngineCoreOutput
from ..outputs import CompletionOutput, PositionLogprobs, RequestOutput
from ..sampling_params import SamplingParams
from .detokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)


@dataclass
class _Sequence:
    core_request_id: str
    index: int
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    #: Why this sequence failed (finish_reason "error").
    error: str | None = None

    @property
    def text(self) -> str:
        return self.detokenizer.text if self.detokenizer is not None else ""

    @property
    def stream_text(self) -> str:
        """The text that can be shown now: while the sequence runs, a tail that could still
        turn into a stop string is held back, so streamed text is always a prefix of the
        final text."""
        if self.detokenizer is None:
            return ""
        finished = self.finish_reason is not None
        return self.detokenizer.text[: self.detokenizer.stream_safe_length(finished)]


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[_Sequence]
    arrival_time: float
    stream: bool = False
    first_token_time: float | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: list[PositionLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)

    @property
    def error(self) -> str | None:
        return next((s.error for s in self.sequences if s.error is not None), None)


@dataclass
class ProcessedOutputs:
    request_outputs: list[RequestOutput]
    #: Core requests that a stop string ended: the caller finishes them in the core.
    stopped_core_requests: list[str]
    #: Core requests to abort in the core: siblings of a failed sequence, and sequences
    #: whose output could not be processed here.
    aborted_core_requests: list[str] = field(default_factory=list)


class OutputProcessor:
    """With ``stream=True`` every step yields an output for each request that changed;
    otherwise a request yields one output, when its last sequence finishes. ``add_request``
    may choose per request. A streamed output's text holds back what could still become a
    stop string, so successive texts of one sequence only ever grow."""

    def __init__(self, tokenizer: Any | None, stream: bool = False) -> None:
        self.tokenizer = tokenizer
        self.stream = stream
        self.requests: dict[str, _Request] = {}
        self.sequence_of: dict[str, _Sequence] = {}
        self.request_of: dict[str, _Request] = {}
        #: Token id -> its text alone, for log-probs (at most the vocabulary; a position's
        #: 20 alternatives would otherwise cost 20 decodes on the event loop every step).
        self._token_texts: dict[int, str] = {}

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        children: list[tuple[str, SamplingParams]],
        arrival_time: float | None = None,
        stream: bool | None = None,
    ) -> None:
        sequences = []
        for index, (core_id, params) in enumerate(children):
            detokenizer = None
            if self.tokenizer is not None:
                detokenizer = IncrementalDetokenizer(
                    self.tokenizer,
                    prompt_token_ids,
                    params.stop,
                    params.skip_special_tokens,
                    params.include_stop_str_in_output,
                )
            sequence = _Sequence(core_id, index, params, detokenizer)
            if params.logprobs is not None:
                sequence.logprobs, sequence.cumulative_logprob = [], 0.0
            sequences.append(sequence)
        request = _Request(
            request_id,
            prompt,
            list(prompt_token_ids),
            sequences,
            arrival_time if arrival_time is not None else time.monotonic(),
            stream=self.stream if stream is None else stream,
        )
        self.requests[request_id] = request
        for sequence in sequences:
            self.sequence_of[sequence.core_request_id] = sequence
            self.request_of[sequence.core_request_id] = request

    def abort_request(self, request_id: str) -> list[str]:
        """Forget a request; returns the core ids still to abort."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return []
        pending = []
        for sequence in request.sequences:
            self.sequence_of.pop(sequence.core_request_id, None)
            self.request_of.pop(sequence.core_request_id, None)
            if sequence.finish_reason is None:
                pending.append(sequence.core_request_id)
        return pending

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def process_outputs(self, core_outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        changed: dict[str, _Request] = {}
        stopped: list[str] = []
        aborted: list[str] = []
        now = time.monotonic()
        for output in core_outputs:
            sequence = self.sequence_of.get(output.request_id)
            if sequence is None or sequence.finish_reason is not None:
                continue
            request = self.request_of[output.request_id]
            if request.first_token_time is None:
                request.first_token_time = now
            request.num_cached_tokens = max(request.num_cached_tokens, output.num_cached_tokens)
            if output.prompt_logprobs is not None and request.prompt_logprobs is None:
                request.prompt_logprobs = self._decoded_prompt_logprobs(output.prompt_logprobs)
            try:
                if faults.ACTIVE:
                    faults.inject("detokenize", output.request_id)
                if self._append(sequence, output):
                    stopped.append(output.request_id)
            except Exception as error:  # this request's output alone
                logger.exception("processing an output of %s failed", output.request_id)
                sequence.finish_reason = "error"
                sequence.error = f"processing its output failed: {type(error).__name__}: {error}"
                if not output.finished:
                    aborted.append(output.request_id)
            if sequence.error is not None:
                aborted.extend(_abort_siblings(request))
            changed[request.request_id] = request
        results = []
        for request in changed.values():
            finished = request.finished
            if finished:
                del self.requests[request.request_id]
                for sequence in request.sequences:
                    self.sequence_of.pop(sequence.core_request_id, None)
                    self.request_of.pop(sequence.core_request_id, None)
            if request.stream or finished:
                results.append(self._request_output(request, finished))
        return ProcessedOutputs(results, stopped, aborted)

    def _append(self, sequence: _Sequence, output: EngineCoreOutput) -> bool:
        """Add one step's tokens; True when a stop string ended the sequence here."""
        sequence.token_ids.extend(output.new_token_ids)
        if output.new_logprobs is not None and sequence.logprobs is not None:
            for token_id, position in zip(output.new_token_ids, output.new_logprobs):
                self._decode_logprobs(position)
                sequence.logprobs.append(position)
                sequence.cumulative_logprob += position[token_id].logprob
        stop_hit = None
        if sequence.detokenizer is not None:
            check = len(sequence.token_ids) >= sequence.params.min_tokens
            new_token_ids = output.new_token_ids
            if _ends_on_stop_token(output) and not sequence.params.include_stop_str_in_output:
                new_token_ids = new_token_ids[:-1]  # EOS or a stop token id: not in the text
            stop_hit = sequence.detokenizer.update(new_token_ids, check_stop=check)
        if stop_hit is not None:
            taken = sequence.detokenizer.num_taken
            self._drop_after_stop(sequence, len(output.new_token_ids) - taken)
            sequence.finish_reason, sequence.stop_reason = "stop", stop_hit
            return not output.finished
        if output.finished:
            sequence.finish_reason, sequence.stop_reason = output.finish_reason, output.stop_reason
            sequence.error = output.error
            if sequence.detokenizer is not None and output.error is None:
                sequence.detokenizer.flush()
        return False

    @staticmethod
    def _drop_after_stop(sequence: _Sequence, extra: int) -> None:
        """Take back the ``extra`` last tokens (and their log-probs): a step brought them
        after the token that completed a stop string."""
        if extra <= 0:
            return
        removed = sequence.token_ids[-extra:]
        del sequence.token_ids[-extra:]
        if sequence.logprobs is not None and len(sequence.logprobs) >= extra:
            for token_id, position in zip(removed, sequence.logprobs[-extra:]):
                sequence.cumulative_logprob -= position[token_id].logprob
            del sequence.logprobs[-extra:]

    def _decoded_prompt_logprobs(
        self, entries: list[PositionLogprobs | None]
    ) -> list[PositionLogprobs | None]:
        for position in entries:
            if position is not None:
                self._decode_logprobs(position)
        return entries

    def _decode_logprobs(self, position: PositionLogprobs) -> None:
        if self.tokenizer is None:
            return
        texts = self._token_texts
        for token_id, logprob in position.items():
            text = texts.get(token_id)
            if text is None:
                text = texts[token_id] = self.tokenizer.decode([token_id])
            logprob.decoded_token = text

    def _request_output(self, request: _Request, finished: bool) -> RequestOutput:
        outputs = [
            CompletionOutput(
                index=s.index,
                text=s.stream_text if request.stream else s.text,
                token_ids=list(s.token_ids),
                cumulative_logprob=s.cumulative_logprob,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
            )
            for s in request.sequences
        ]
        metrics = {"arrival_time": request.arrival_time}
        if request.first_token_time is not None:
            metrics["first_token_time"] = request.first_token_time
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=outputs,
            finished=finished,
            num_cached_tokens=request.num_cached_tokens,
            metrics=metrics,
            prompt_logprobs=request.prompt_logprobs,
            error=request.error,
        )


def _ends_on_stop_token(output: EngineCoreOutput) -> bool:
    """The core stopped the sequence on its last new token (EOS or a stop token id)."""
    return output.finish_reason == "stop" and bool(output.new_token_ids)


def _abort_siblings(request: _Request) -> list[str]:
    """End the unfinished sequences of a failed request; their core ids, to abort."""
    pending = []
    for sibling in request.sequences:
        if sibling.finish_reason is None:
            sibling.finish_reason = "abort"
            pending.append(sibling.core_request_id)
    return pending
