"""Runs one engine step on one device: step inputs -> model -> logits -> sampled tokens.

A request whose inputs cannot be built, or whose sampling raises, fails alone: the step
runs without it (inputs) or gives it a placeholder token (sampling), and the step's result
names it with the reason, so the scheduler finishes it with an error. Faults that
:func:`~metroline.engine.faults.poisons_engine` still stop the engine.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .. import faults
from ..config import EngineConfig
from ..distributed import get_tp_group
from ..host_timing import HostTimer
from ..layers.sampler import NO_TOKEN, Sampler
from ..messages import NewRequestData, SchedulerOutput
from ..outputs import PositionLogprobs
from .cuda_graphs import StepGraphs, mixed_pool_bytes, use_mixed_step_graphs
from .draft_proposer import DraftProposer
from .grammar_bitmask import apply_token_bitmask
from .host_staging import StepStaging
from .input_isolation import build_isolating
from .prompt_logprobs import compute_prompt_logprobs, prompt_logprob_rows
from .sampled_rows import plain_greedy, wanted_logprobs
from .spec_sampling import sample_drafted_batch
from .step_inputs import (
    PreviousSample,
    StepInputs,
    WorkerRequestState,
    build_sampling_metadata,
    build_step_inputs,
)
from .step_result import PendingSample, StepResult
from .token_constraints import RequestConstraints, request_constraints

logger = logging.getLogger(__name__)


class ModelRunner:
    """Keeps per-request state across steps (updated from the scheduler's diffs).

    Every TP rank runs the same forward pass; only the driver (rank 0) receives the logits,
    samples, and returns tokens. Other ranks return ``None``.
    """

    def __init__(
        self,
        config: EngineConfig,
        model: nn.Module,
        device: torch.device,
        is_driver: bool = True,
        drafter: DraftProposer | None = None,
    ) -> None:
        self.config = config
        #: With a draft model: fills each step's placeholder drafts before its forward pass.
        self.drafter = drafter
        self.is_driver = is_driver
        self.model = model
        self.device = device
        self.block_size = config.cache.block_size
        self.vocab_size = config.model.arch.vocab_size
        self.sampler = Sampler()
        self.step_graphs: StepGraphs | None = None
        self.previous_sample: PreviousSample | None = None
        # Asynchronous scheduling with TP: plans reach the workers before the tokens they
        # continue from, so every step's sampled tokens go from the driver to all ranks on
        # the device (one small broadcast, no host synchronisation).
        self.share_samples = bool(config.async_scheduling) and get_tp_group().world_size > 1
        self.host_timer = HostTimer()
        self.states: dict[str, WorkerRequestState] = {}
        # Persistent pinned buffers for each step's inputs and sampling columns.
        self.input_staging = StepStaging(device)
        self.sampling_staging = StepStaging(device)
        # Outlive preemption: a resumed request continues its random stream.
        self.generators: dict[str, torch.Generator] = {}
        # Requests whose prompt log-probs are still to be computed (usually none).
        self.prompt_logprob_requests: set[str] = set()

    def update_states(self, scheduled: SchedulerOutput) -> None:
        for request_id in scheduled.finished_request_ids:
            self.states.pop(request_id, None)
            self.generators.pop(request_id, None)
            self.prompt_logprob_requests.discard(request_id)
        for request_id in scheduled.preempted_request_ids:
            self.states.pop(request_id, None)
            self.prompt_logprob_requests.discard(request_id)
        for new in scheduled.new_requests:
            params = new.sampling_params
            generator = self.generators.get(new.request_id)
            if generator is None and params.seed is not None and self.is_driver:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(params.seed)
                self.generators[new.request_id] = generator
            wants_prompt_logprobs = params.prompt_logprobs is not None and not new.num_output_tokens
            self.states[new.request_id] = WorkerRequestState(
                request_id=new.request_id,
                token_ids=list(new.token_ids),
                num_prompt_tokens=len(new.token_ids) - new.num_output_tokens,
                block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens,
                num_draft_computed=new.num_computed_tokens,
                sampling_params=params,
                eos_token_ids=new.eos_token_ids,
                generator=generator,
                constraints=self._constraints_of(new) if self.is_driver else None,
                wants_prompt_logprobs=wants_prompt_logprobs,
            )
            if wants_prompt_logprobs:
                self.prompt_logprob_requests.add(new.request_id)
        for running in scheduled.running_requests:
            state = self.states[running.request_id]
            state.token_ids.extend(running.new_token_ids)
            if running.num_kept_blocks >= 0:
                del state.block_ids[running.num_kept_blocks :]
            state.block_ids.extend(running.new_block_ids)
            state.num_computed_tokens = running.num_computed_tokens
            # Draft KV past the target's accepted tokens is of rejected drafts: recomputed.
            state.num_draft_computed = min(state.num_draft_computed, state.num_computed_tokens)

    def _constraints_of(self, new: NewRequestData) -> RequestConstraints | None:
        """The request's logits constraints on the device, built once (freed with its
        state when it finishes or is preempted)."""
        return request_constraints(
            new.sampling_params,
            new.eos_token_ids,
            new.bad_words_token_ids,
            self.vocab_size,
            self.device,
        )

    @torch.inference_mode()
    def execute_model_async(self, scheduled: SchedulerOutput) -> StepResult | PendingSample:
        """Launch one step and return without waiting for the device. Only the driver
        (rank 0) samples; other ranks' results are ``None``. With grammar rows among the
        sampled requests the driver's sampling waits (a :class:`PendingSample`)."""
        timer = self.host_timer
        with timer.phase("runner.update_states"):
            self.update_states(scheduled)
            if scheduled.is_empty:
                return StepResult.empty(self.is_driver)
        if self.drafter is not None:
            with timer.phase("runner.draft_model"):
                scheduled = self.drafter.propose(scheduled, self.states)
        with timer.phase("runner.build_inputs"):
            inputs, failed = self._build_inputs(scheduled)
            unwritten = frozenset(failed)
        if inputs is None:  # every request of the step failed
            return StepResult.empty(self.is_driver, failed, unwritten)
        graphs = self.step_graphs
        # Attention rows, not requests: a verification step has one per token.
        num_tokens, num_seqs = inputs.input_ids.shape[0], inputs.attn_metadata.seq_lens.shape[0]
        key = graphs.key_for(num_seqs, num_tokens) if graphs is not None else None
        if key is not None:
            with timer.phase(f"runner.forward_graph_{key[0]}"):
                hidden = graphs.run(key, inputs.input_ids, inputs.positions, inputs.attn_metadata)
        else:
            with timer.phase("runner.forward_eager"):
                hidden = self.model(inputs.input_ids, inputs.positions, inputs.attn_metadata)
        prompt_logprobs = {}
        if self.prompt_logprob_requests:
            with timer.phase("runner.prompt_logprobs"):
                prompt_logprobs = self._prompt_logprobs(hidden, scheduled, failed)
        if not inputs.sampled_request_ids:
            return StepResult.empty(self.is_driver, failed, unwritten, prompt_logprobs)
        grammar_rows = scheduled.grammar_request_ids
        if self.is_driver and not grammar_rows.isdisjoint(inputs.sampled_request_ids):
            return self._pending_sample(
                hidden, scheduled, inputs, failed, unwritten, prompt_logprobs
            )
        with timer.phase("runner.logits_and_sampling"):
            result = self._sample(hidden, inputs, failed, unwritten)
        result.prompt_logprobs = prompt_logprobs
        return result

    def _pending_sample(
        self,
        hidden: torch.Tensor,
        scheduled: SchedulerOutput,
        inputs: StepInputs,
        failed: dict[str, str],
        unwritten: frozenset[str],
        prompt_logprobs: dict[str, tuple[int, list[PositionLogprobs]]],
    ) -> PendingSample:
        """The driver's step with grammar rows: the logits are computed (and, with TP,
        gathered) now, the sampling once the core gives the bitmask."""
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        planned = scheduled.sampling_request_ids
        kept = inputs.sampled_request_ids
        position = {r: row for row, r in enumerate(planned)} if kept != planned else {}
        keep = [position[r] for r in kept] if position else None

        def sample(bitmask: torch.Tensor) -> StepResult:
            with torch.inference_mode(), self.host_timer.phase("runner.logits_and_sampling"):
                masked = logits.float()
                rows = bitmask if keep is None else bitmask[torch.tensor(keep)]
                if inputs.drafts is not None:  # a request with k drafts has k + 1 rows
                    counts = torch.tensor([len(d) + 1 for d in inputs.drafts])
                    rows = rows.repeat_interleave(counts, dim=0)
                apply_token_bitmask(masked, rows)
                result = self._sample_logits(masked, inputs, failed, unwritten)
            result.prompt_logprobs = prompt_logprobs
            return result

        return PendingSample(sample)

    def _prompt_logprobs(
        self, hidden: torch.Tensor, scheduled: SchedulerOutput, failed: dict[str, str]
    ) -> dict[str, tuple[int, list[PositionLogprobs]]]:
        """Log-probs of the prompt tokens this step computed, for the requests asking."""
        request_ids = [r for r in scheduled.num_scheduled_tokens if r not in failed]
        wanted = prompt_logprob_rows(scheduled, self.states, request_ids)
        for request_id in list(self.prompt_logprob_requests):
            state = self.states.get(request_id)
            if state is None or not state.wants_prompt_logprobs:
                self.prompt_logprob_requests.discard(request_id)
        max_rows = max(1, min(self.config.scheduler.max_num_seqs, 2**26 // self.vocab_size))
        return compute_prompt_logprobs(self.model, hidden, wanted, max_rows)

    def _build_inputs(self, scheduled: SchedulerOutput) -> tuple[StepInputs | None, dict[str, str]]:
        return build_isolating(scheduled, self._build_inputs_of)

    def _build_inputs_of(self, scheduled: SchedulerOutput) -> StepInputs:
        if faults.ACTIVE:
            for request_id in scheduled.num_scheduled_tokens:
                faults.inject("inputs", request_id)
        return build_step_inputs(
            scheduled, self.states, self.block_size, self.input_staging, self.previous_sample
        )

    def _sample(
        self,
        hidden: torch.Tensor,
        inputs: StepInputs,
        failed: dict[str, str],
        unwritten: frozenset[str],
    ) -> StepResult:
        """Logits of the sampling rows, gathered to the driver, which samples (and with
        asynchronous TP broadcasts the tokens). ``failed`` (requests whose inputs failed)
        gains the requests whose sampling fails."""
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        if logits is None:  # a worker rank: the driver samples
            if self.share_samples:
                tokens = torch.empty(
                    len(inputs.sampled_request_ids), dtype=torch.int64, device=self.device
                )
                self._remember_sample(get_tp_group().broadcast(tokens), inputs)
            return StepResult.empty(False, failed, unwritten)
        return self._sample_logits(logits.float(), inputs, failed, unwritten)

    def _sample_logits(
        self,
        logits: torch.Tensor,
        inputs: StepInputs,
        failed: dict[str, str],
        unwritten: frozenset[str],
    ) -> StepResult:
        """The driver's sampling of ``logits`` (fp32, one row per sampled request, or with
        drafts the rows of :mod:`.spec_sampling`)."""
        states = [self.states[r] for r in inputs.sampled_request_ids]
        if inputs.drafts is not None:  # plain-order steps: nothing to remember for the next
            width = self.config.speculative.num_speculative_tokens
            done = sample_drafted_batch(
                self.sampler, logits, states, inputs.drafts, width, self.vocab_size,
                self.sampling_staging, failed,
            )  # fmt: skip
            return StepResult(
                inputs.sampled_request_ids, done.tokens, done.logprobs, failed, unwritten,
                spec_token_ids=done.spec_tokens, spec_logprobs=done.spec_logprobs,
            )  # fmt: skip
        generators = [s.generator for s in states if s.generator is not None]
        saved = [g.get_state() for g in generators]
        try:
            tokens, logprobs = self._sample_rows(logits, states)
        except Exception as error:
            if faults.poisons_engine(error):
                raise
            for generator, state in zip(generators, saved):
                generator.set_state(state)  # the retry draws what the batch would have
            tokens, logprobs = self._sample_each_row(logits, states, failed, error)
        # A row left without any allowed token is sampled as -1 (the scheduler fails that
        # request); the next step's inputs, here and on the other ranks, read token 0.
        next_inputs = tokens.to(torch.int64).clamp(min=0)
        if self.share_samples:
            next_inputs = get_tp_group().broadcast(next_inputs.contiguous())
        self._remember_sample(next_inputs, inputs)
        return StepResult(inputs.sampled_request_ids, tokens, logprobs, failed, unwritten)

    def _sample_rows(
        self, logits: torch.Tensor, states: list[WorkerRequestState]
    ) -> tuple[torch.Tensor, dict[str, PositionLogprobs]]:
        """One token per row of ``logits`` (``[rows, vocab]`` fp32) and the log-probs asked."""
        if faults.ACTIVE:
            for state in states:
                faults.inject("sampling", state.request_id)
        if all(plain_greedy(state) for state in states):
            best, tokens = logits.max(dim=-1)
            return tokens.masked_fill(torch.isneginf(best), NO_TOKEN), {}
        meta = build_sampling_metadata(states, self.vocab_size, self.sampling_staging)
        result = self.sampler(logits, meta)
        logprobs = {}
        if meta.max_num_logprobs is not None:  # log-probs were read back already
            logprobs = wanted_logprobs(states, result.sampled.tolist(), result.logprobs)
        return result.sampled, logprobs

    def _sample_each_row(
        self,
        logits: torch.Tensor,
        states: list[WorkerRequestState],
        failed: dict[str, str],
        batch_error: Exception,
    ) -> tuple[torch.Tensor, dict[str, PositionLogprobs]]:
        """After a batch failed: each row alone (a row draws the same as in the batch, its
        transforms being per row); a row that fails gets token 0 and joins ``failed``. If no
        row fails alone, nothing explains ``batch_error``: it is raised."""
        rows: list[torch.Tensor] = []
        logprobs: dict[str, PositionLogprobs] = {}
        newly_failed: dict[str, str] = {}
        for row, state in enumerate(states):
            try:
                tokens, row_logprobs = self._sample_rows(logits[row : row + 1], [state])
            except Exception as error:
                if faults.poisons_engine(error):
                    raise
                newly_failed[state.request_id] = f"sampling failed: {faults.describe(error)}"
                tokens, row_logprobs = torch.zeros(1, dtype=torch.int64, device=logits.device), {}
            rows.append(tokens.to(torch.int64))
            logprobs.update(row_logprobs)
        if not newly_failed:
            raise batch_error
        logger.error("sampling failed for %d request(s): %s", len(newly_failed), newly_failed)
        failed.update(newly_failed)
        return torch.cat(rows), logprobs

    def _remember_sample(self, tokens: torch.Tensor, inputs: StepInputs) -> None:
        self.previous_sample = PreviousSample(
            tokens, {r: row for row, r in enumerate(inputs.sampled_request_ids)}
        )

    def wants_mixed_step_graphs(self) -> bool:
        config = self.config
        if self.device.type != "cuda" or config.enforce_eager:
            return False
        tp, speculative = get_tp_group().world_size, config.speculative is not None
        return use_mixed_step_graphs(config.mixed_step_graphs, tp, speculative)

    def graph_pool_reserve(self, activation_bytes: int) -> int:
        """Bytes to keep out of the KV pool for the mixed-step graphs (0 without them)."""
        if not self.wants_mixed_step_graphs():
            return 0
        return mixed_pool_bytes(activation_bytes, self.config.scheduler.max_num_batched_tokens)

    def capture_cuda_graphs(self) -> float:
        """Capture the step CUDA graphs (after the KV pool is bound); returns seconds taken."""
        sched = self.config.scheduler
        mixed = self.wants_mixed_step_graphs()
        reserved = torch.cuda.memory_reserved(self.device)
        self.step_graphs = StepGraphs(
            self.model,
            sched.max_num_seqs,
            sched.max_num_batched_tokens,
            sched.max_model_len,
            self.block_size,
            self.device,
            mixed=mixed,
        )
        seconds = self.step_graphs.capture()
        if self.drafter is not None:
            self.drafter.capture_cuda_graphs(
                sched.max_num_seqs, sched.max_num_batched_tokens, sched.max_model_len
            )
        logger.info(
            "CUDA graphs hold %.2f GiB",
            (torch.cuda.memory_reserved(self.device) - reserved) / 2**30,
        )
        return seconds

    @torch.inference_mode()
    def profile_run(self) -> None:
        """The largest step's forward pass, and the sampler at the most logits rows a step
        can have (K + 1 a sequence with speculation), without the KV pool: peak memory."""
        sched = self.config.scheduler
        num_tokens = sched.max_num_batched_tokens
        input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        positions = torch.arange(num_tokens, device=self.device) % sched.max_model_len
        hidden = self.model(input_ids, positions, None)
        spec = self.config.speculative  # a verifying request has K + 1 logits rows
        drafts = spec.num_speculative_tokens if spec else 0
        rows = min(sched.max_num_seqs * (1 + drafts), num_tokens)
        logits = self.model.compute_logits(hidden[:rows])
        if logits is not None:
            torch.softmax(logits.float(), dim=-1).sort(dim=-1)
        del hidden, logits
        if self.drafter is not None:  # its passes mirror the step's tokens
            self.drafter.profile_run(rows, sched.max_model_len)
