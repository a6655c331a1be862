"""Continuous batching under a token budget.

There is no prefill or decode phase: every request simply has ``num_computed_tokens``
catching up with ``num_tokens``. Each step serves running requests first (a decode needs one
token, a prefill as large a chunk as the budget allows), then admits waiting requests in
arrival order while the budget, ``max_num_seqs`` and free KV blocks allow. When a running
request cannot get a block, the newest running request is preempted by recompute: its blocks
are freed and it returns to the head of the queue, keeping the tokens it generated.

With speculative decoding a decoding request may also schedule draft tokens after its next
one (:mod:`.speculation`), once every running request has its own tokens: they count against
the budget and get KV slots like any token, but never preempt.
Once the step verified them, the request keeps the accepted drafts and the target's token
(stop conditions checked token by token), and the slots past its computed tokens are
trimmed.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable

from .. import faults
from ..config import SchedulerConfig
from ..messages import (
    NO_ALLOWED_TOKEN,
    EngineCoreOutput,
    ModelRunnerOutput,
    NewRequestData,
    RequestStatus,
    RunningRequestData,
    SchedulerOutput,
    SchedulerStats,
)
from ..spec_decode.config import SpeculativeConfig
from .kv_cache import KVBlock, KVCacheManager
from .request import Request
from .speculation import Speculation, may_draft
from .stop_checks import at_limit, stop_status

logger = logging.getLogger(__name__)


class Scheduler:
    """Owns the request queues and decides each step's batch.

    Invariants: a request is in exactly one of ``waiting`` / ``running`` until it finishes;
    ``len(running) <= max_num_seqs``; finished requests hold no KV blocks.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        kv_cache_manager: KVCacheManager,
        speculative: SpeculativeConfig | None = None,
    ) -> None:
        self.config = config
        self.speculation = (
            Speculation(speculative, config.max_model_len) if speculative is not None else None
        )
        self.kv_cache_manager = kv_cache_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.num_steps = 0
        self.num_prefill_steps = 0
        self.num_scheduled_tokens = 0
        self._finished_since_last_step: set[str] = set()
        # How many of each request's tokens the workers already know, for diffs.
        self._sent_tokens: dict[str, int] = {}
        # Requests whose blocks were trimmed since the workers last saw them: blocks kept.
        self._kept_blocks: dict[str, int] = {}
        self._num_exact_history = 0

    # ---- requests in and out -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)
        if request.needs_exact_history:
            self._num_exact_history += 1

    def needs_exact_history(self) -> bool:
        """Some request samples from its full token history (penalties, min_tokens, bad
        words of several tokens): steps must not run ahead of the tokens read back."""
        return self._num_exact_history > 0

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        """End requests from outside (abort, stop string): their blocks return at once."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._finish(request, status)

    def fail_requests(self, reasons: dict[str, str]) -> list[EngineCoreOutput]:
        """Finish these requests with an error now (their blocks return at once); a token
        a step still samples for them is dropped."""
        outputs = [self._fail(self.requests[r], why) for r, why in reasons.items()]
        self.running = [r for r in self.running if r.status == RequestStatus.RUNNING]
        return outputs

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def stats(self) -> SchedulerStats:
        kv = self.kv_cache_manager
        spec = self.speculation
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=kv.usage,
            prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits,
            num_preemptions=self.num_preemptions,
            num_steps=self.num_steps,
            num_prefill_steps=self.num_prefill_steps,
            num_scheduled_tokens=self.num_scheduled_tokens,
            spec_num_drafts=spec.num_drafts if spec else 0,
            spec_num_draft_tokens=spec.num_draft_tokens if spec else 0,
            spec_num_accepted_tokens=spec.num_accepted_tokens if spec else 0,
            spec_accepted_per_position=tuple(spec.accepted_per_position) if spec else (),
        )

    # ---- one step ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Plan the next step. ``num_computed_tokens`` advances here, so a plan may be made
        while the previous step still runs: a request whose token is being sampled by that
        step schedules the position of that token without knowing its value."""
        out = SchedulerOutput(finished_request_ids=self._finished_since_last_step)
        self._finished_since_last_step = set()
        budget = self.config.max_num_batched_tokens
        kv = self.kv_cache_manager

        drafting: list[tuple[Request, RunningRequestData]] = []
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if at_limit(request, self.config.max_model_len):
                index += 1  # its last token is still being sampled; it finishes then
                continue
            target = request.num_tokens + request.num_pending_samples
            num_new = min(target - request.num_computed_tokens, budget)
            drafts_later = self.speculation is not None and may_draft(request)
            while (new_blocks := kv.allocate_slots(request, num_new)) is None:
                victim = self.running.pop()
                self._preempt(victim, out)
                if victim is request:
                    break
            if new_blocks is None:
                break
            diff = self._diff(request, new_blocks)
            out.running_requests.append(diff)
            self._account(request, num_new, out)
            budget -= num_new
            if drafts_later:
                drafting.append((request, diff))
            index += 1
        if drafting:  # after every running request's own tokens: drafts never preempt
            budget = self.speculation.add_drafts(drafting, out, kv, budget)

        while (
            not out.preempted_request_ids
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
            and self.waiting[0].num_pending_samples == 0
        ):
            request = self.waiting[0]
            hits, num_hit_tokens = (
                kv.get_computed_blocks(request) if request.reads_prefix_cache else ([], 0)
            )
            num_new = min(request.num_tokens - num_hit_tokens, budget)
            if kv.allocate_slots(request, num_new, hits) is None:
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
            self.running.append(request)
            out.new_requests.append(self._whole(request))
            self._account(request, num_new, out)
            budget -= num_new
        self._count_step(out)
        return out

    def _count_step(self, out: SchedulerOutput) -> None:
        num_tokens = out.total_num_scheduled_tokens
        if num_tokens:
            self.num_steps += 1
            self.num_scheduled_tokens += num_tokens
            drafts = sum(map(len, out.spec_token_ids.values()))  # verification, not prompts
            if num_tokens - drafts > len(out.num_scheduled_tokens):
                self.num_prefill_steps += 1

    def update_from_output(
        self, scheduled: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Append the tokens the step sampled and finish requests that stop; finish with an
        error the requests the step failed, and any whose token cannot be taken (the others
        go on)."""
        outputs = []
        any_finished = False
        failed = dict(runner_output.failed)
        if runner_output.unwritten:
            failed.update(self._forget_unwritten(scheduled, runner_output.unwritten, failed))
        for request_id, message in failed.items():
            request = self.requests.get(request_id)
            if request is not None:
                outputs.append(self._fail(request, message))
                any_finished = True
        for request_id, (first, entries) in runner_output.prompt_logprobs.items():
            request = self.requests.get(request_id)
            if request is not None:
                request.add_prompt_logprobs(first, entries)
        for request_id in scheduled.sampling_request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue  # finished, aborted or failed while the step ran: no token
            try:
                output = self._take_token(request, scheduled, runner_output)
            except Exception as error:
                if faults.poisons_engine(error):
                    raise
                logger.exception("taking the sampled token of %s failed", request_id)
                output = self._fail(request, f"taking its token failed: {error}")
            any_finished = any_finished or output.finished
            outputs.append(output)
        if any_finished:
            self.running = [r for r in self.running if r.status == RequestStatus.RUNNING]
        return outputs

    def _take_token(
        self, request: Request, scheduled: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> EngineCoreOutput:
        """Append the token(s) the step gave ``request``: one, or after verifying drafts the
        accepted ones and the target's (each checked for a stop; the rest are dropped)."""
        request_id = request.request_id
        if faults.ACTIVE:
            faults.inject("update", request_id)
        request.num_pending_samples -= 1
        tokens = runner_output.spec_token_ids.get(request_id)
        if tokens is None:
            tokens = [runner_output.sampled_token_ids[request_id]]
            logprobs = runner_output.logprobs.get(request_id)
            entries = [logprobs] if logprobs is not None else None
        else:
            drafts = scheduled.spec_token_ids[request_id]
            self.speculation.record(len(drafts), len(tokens) - 1)
            entries = runner_output.spec_logprobs.get(request_id)
        status = None
        taken = 0
        for token in tokens:
            refused = NO_ALLOWED_TOKEN if token < 0 else None
            if refused is None and request.grammar is not None:
                refused = request.grammar.accept(token)
            if refused is not None:  # the tokens taken before it still reach the client
                failed = self._fail(request, refused)
                failed.new_token_ids = tokens[:taken]
                failed.new_logprobs = entries[:taken] if entries is not None and taken else None
                return failed
            request.append_output_token(token)
            taken += 1
            status = stop_status(request, token, self.config.max_model_len)
            if status is not None:
                break
        if request_id in scheduled.spec_token_ids and status is None:
            kept = self.speculation.settle(request, self.kv_cache_manager)
            if kept is not None:
                self._kept_blocks[request_id] = kept
        output = EngineCoreOutput(
            request_id=request_id,
            new_token_ids=tokens[:taken],
            new_logprobs=entries[:taken] if entries is not None else None,
            num_cached_tokens=max(request.num_cached_tokens, 0),
        )
        if request.prompt_logprobs is not None:
            output.prompt_logprobs, request.prompt_logprobs = request.prompt_logprobs, None
        if status is not None:
            self._finish_anywhere(request, status)
            output.finish_reason = status.value
            output.stop_reason = request.stop_reason
        return output

    def _forget_unwritten(
        self, scheduled: SchedulerOutput, unwritten: frozenset[str], failed: dict[str, str]
    ) -> dict[str, str]:
        """The step ran without ``unwritten`` requests, so the blocks they were given from
        its first token on hold no KV: take them out of the prefix cache. Requests that hit
        those blocks already (in this step or one planned since) read them: they fail too.
        Returns those, with the reason."""
        starts = {r.request_id: r.num_computed_tokens for r in scheduled.new_requests}
        starts.update({r.request_id: r.num_computed_tokens for r in scheduled.running_requests})
        blocks = []
        for request_id in unwritten:
            request = self.requests.get(request_id)
            if request is not None and request_id in starts:
                blocks += self.kv_cache_manager.forget_unwritten(request, starts[request_id])
        reason = "its prompt shared KV-cache blocks with a request that failed before writing them"
        return {
            holder: reason
            for holder in self.kv_cache_manager.holders(blocks)
            if holder not in failed and holder in self.requests
        }

    def _fail(self, request: Request, message: str) -> EngineCoreOutput:
        """Finish ``request`` with an error (its blocks return at once)."""
        self._finish_anywhere(request, RequestStatus.FINISHED_ERROR)
        return EngineCoreOutput(
            request_id=request.request_id,
            new_token_ids=[],
            finish_reason=RequestStatus.FINISHED_ERROR.value,
            num_cached_tokens=max(request.num_cached_tokens, 0),
            error=message,
        )

    def _finish_anywhere(self, request: Request, status: RequestStatus) -> None:
        """Finish a request that may be running or, preempted while its step ran, waiting;
        the caller drops finished requests from ``running``."""
        if request.status != RequestStatus.RUNNING:
            self.waiting.remove(request)
        self._finish(request, status)

    # ---- internals -----------------------------------------------------------------------

    def _account(self, request: Request, num_new: int, out: SchedulerOutput) -> None:
        """Record ``num_new`` scheduled tokens; mark the request as sampling if they reach
        the end of its tokens."""
        out.num_scheduled_tokens[request.request_id] = num_new
        request.num_computed_tokens += num_new
        if request.num_computed_tokens == request.num_tokens + request.num_pending_samples:
            request.num_pending_samples += 1
            out.sampling_request_ids.append(request.request_id)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.needs_exact_history:
            self._num_exact_history -= 1
        request.status = status
        self.kv_cache_manager.free(request)
        del self.requests[request.request_id]
        self._forget_sent(request.request_id)
        self._finished_since_last_step.add(request.request_id)
        if self.speculation is not None:
            self.speculation.forget(request.request_id)

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        self._forget_sent(request.request_id)
        out.preempted_request_ids.add(request.request_id)
        logger.debug("preempted %s (%d tokens)", request.request_id, request.num_tokens)

    def _forget_sent(self, request_id: str) -> None:
        self._sent_tokens.pop(request_id, None)
        self._kept_blocks.pop(request_id, None)

    def _whole(self, request: Request) -> NewRequestData:
        """A request the workers do not know (new, or resumed after preemption), sent before
        its tokens are accounted: ``num_computed_tokens`` is where this step starts."""
        self._sent_tokens[request.request_id] = request.num_tokens
        return NewRequestData(
            request_id=request.request_id,
            token_ids=list(request.all_token_ids),
            sampling_params=request.sampling_params,
            block_ids=self.kv_cache_manager.block_ids(request),
            num_computed_tokens=request.num_computed_tokens,
            num_output_tokens=request.num_output_tokens,
            eos_token_ids=tuple(sorted(request.eos_token_ids)),
            bad_words_token_ids=request.bad_words_token_ids,
        )

    def _diff(self, request: Request, new_blocks: list[KVBlock]) -> RunningRequestData:
        """What changed since the workers last saw the request; sent before its tokens are
        accounted, so ``num_computed_tokens`` is where this step starts."""
        request_id = request.request_id
        sent_tokens = self._sent_tokens[request_id]
        self._sent_tokens[request_id] = request.num_tokens
        return RunningRequestData(
            request_id=request_id,
            new_token_ids=request.all_token_ids[sent_tokens:],
            new_block_ids=[block.block_id for block in new_blocks],
            num_computed_tokens=request.num_computed_tokens,
            num_kept_blocks=self._kept_blocks.pop(request_id, -1),
        )
