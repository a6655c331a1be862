"""The draft model of speculative decoding (``{"method": "draft_model"}``), on one rank.

Before each step's forward pass the scheduler's plan holds, for every request that drafts,
``k`` placeholder tokens after its next token (the scheduler has counted them against the
budget and given them KV slots). :meth:`DraftProposer.propose` replaces them with the draft
model's greedy continuation, so the target verifies them in the same step.

The draft model's KV lives in the target's blocks: its own tensors, indexed by the same block
ids and slots, so one allocation covers both (the pool's bytes per block count both models:
:attr:`~metroline.engine.config.EngineConfig.kv_bytes_per_block`), and preemption, prefix
caching and trimming after rejected drafts apply to both at once.

Per step, the draft runs:

1. one forward pass over every scheduled request's real tokens (the target's prompt chunks
   and next tokens, mirrored), each starting where its draft KV stops being valid; for a
   drafting request its last row's logits give the first draft;
2. ``k - 1`` single-token passes for the requests still drafting (longest drafts first, so
   the batch of pass ``j`` is a prefix of the drafting rows).

Invariant: ``state.num_draft_computed`` counts the positions for which the draft wrote the
KV of the tokens the request had (or was drafting) when it wrote them; the runner lowers it
to ``num_computed_tokens`` whenever the scheduler's update says fewer tokens were kept (the
target accepted at most the drafts it verified), so the draft recomputes the positions of
rejected drafts, and after a step that accepted every draft the last draft's one token.

Drafts are the draft model's argmax (a one-hot proposal, which is what the verifier's
rejection sampling assumes). If proposing raises, the error is logged and the step verifies
placeholder drafts (token 0: the verifier emits the target's own tokens, so the output is
unchanged; the metrics count them as drafted); the next steps' passes recompute what that
step's did not write. A pass holds at most ``max_pass_tokens`` tokens (what the memory
profile ran), earliest first: a request cut short catches up over the next steps and
verifies placeholders meanwhile. Draft KV only ever changes the drafts, never the target's
output (drafts are proposals; verification decides).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch
from torch import nn

from .. import faults
from ..distributed import get_tp_group
from ..layers.attention import AttentionMetadata
from ..messages import SchedulerOutput
from .cuda_graphs import StepGraphs
from .host_staging import StepStaging
from .step_inputs import MAX_DECODE_ROW_QUERIES, WorkerRequestState, varlen_layout

logger = logging.getLogger(__name__)


class DraftProposer:
    """Runs ``model`` (the draft) on this rank; every rank runs the same passes, the driver
    picks the tokens and broadcasts them."""

    def __init__(
        self, model: nn.Module, block_size: int, device: torch.device, max_pass_tokens: int
    ) -> None:
        self.model = model
        #: Most tokens of one pass (the step's budget plus one a request: a request whose
        #: every draft was accepted recomputes one); the memory profile runs this many.
        self.max_pass_tokens = max_pass_tokens
        self.block_size = block_size
        self.device = device
        self.staging = StepStaging(device)
        self.graphs: StepGraphs | None = None

    def propose(
        self, scheduled: SchedulerOutput, states: dict[str, WorkerRequestState]
    ) -> SchedulerOutput:
        """``scheduled`` with its placeholder drafts replaced by the draft model's (a new
        plan: the caller's is left as it was). Writes the draft KV of the step's tokens."""
        try:
            drafts = self._run(scheduled, states)
        except Exception as error:
            if faults.poisons_engine(error):
                raise
            logger.error("the draft model's proposal failed (%s): this step verifies "
                         "placeholder drafts", faults.describe(error))  # fmt: skip
            drafts = {r: [0] * len(d) for r, d in scheduled.spec_token_ids.items()}
        if not drafts:
            return scheduled
        return dataclasses.replace(scheduled, spec_token_ids=drafts)

    def _run(
        self, scheduled: SchedulerOutput, states: dict[str, WorkerRequestState]
    ) -> dict[str, list[int]]:
        spec = scheduled.spec_token_ids
        request_ids = list(scheduled.num_scheduled_tokens)
        widths = [len(spec.get(r, ())) for r in request_ids]
        ends = [
            states[r].num_computed_tokens + scheduled.num_scheduled_tokens[r] - k
            for r, k in zip(request_ids, widths)
        ]
        # Each request's pass starts where its draft KV stops being valid; the pass holds at
        # most max_pass_tokens (what the memory profile ran), earliest tokens first, and a
        # request cut short catches up in later steps and does not draft in this one.
        room = self.max_pass_tokens
        picked, spans = [], []
        for i, request_id in enumerate(request_ids):
            state = states[request_id]
            start = min(state.num_draft_computed, state.num_computed_tokens)
            end = min(ends[i], start + room)
            if len(state.token_ids) < ends[i] or ends[i] <= start:
                raise RuntimeError(f"request {request_id} is missing input tokens")
            if end > start:
                picked.append(i)
                spans.append((start, end))
                room -= end - start
            if end < ends[i]:
                widths[i] = 0
        step_states = [states[request_ids[i]] for i in picked]
        chunks = [s.token_ids[a:b] for s, (a, b) in zip(step_states, spans)]
        counts = np.fromiter(map(len, chunks), dtype=np.int64, count=len(chunks))
        layout = varlen_layout(
            counts, np.asarray([a for a, _ in spans], dtype=np.int64),
            [s.block_ids for s in step_states], self.block_size,
        )  # fmt: skip
        # Drafting rows (indices into ``picked``), longest drafts first: pass j runs the
        # first rows with k > j.
        rows = sorted(
            (n for n, i in enumerate(picked) if widths[i]), key=lambda n: -widths[picked[n]]
        )
        last_token = layout.cu_seqlens[1:] - 1
        if int(counts.max()) <= MAX_DECODE_ROW_QUERIES:
            layout = layout.as_decode_rows()
        layout.stage(self.staging)
        ids_at = self.staging.add(np.concatenate([np.asarray(c) for c in chunks]), torch.int64)
        rows_at = self.staging.add(last_token[rows], torch.int64)
        on_device = self.staging.to_device()
        hidden = self._forward(
            on_device[ids_at], layout.device_positions(on_device), layout.metadata(on_device)
        )
        for state, (_, end) in zip(step_states, spans):
            state.num_draft_computed = end
        # Requests cut short verify placeholders (see the module docstring).
        drafts = {r: [0] * len(spec[r]) for r, k in zip(request_ids, widths) if r in spec and not k}
        if not rows:
            return drafts
        row_widths = [widths[picked[n]] for n in rows]
        tokens = torch.zeros((len(rows), row_widths[0]), dtype=torch.int64, device=self.device)
        tokens[:, 0] = self._greedy(hidden[on_device[rows_at]], len(rows))
        drafting = [step_states[n] for n in rows]
        positions = np.asarray([spans[n][1] for n in rows], dtype=np.int64)  # of draft 1
        for j in range(1, row_widths[0]):
            active = sum(1 for k in row_widths if k > j)
            inputs = tokens[:active, j - 1]
            hidden = self._decode(drafting[:active], positions[:active] + j - 1, inputs)
            tokens[:active, j] = self._greedy(hidden, active)
        for state, start, k in zip(drafting, positions.tolist(), row_widths):
            state.num_draft_computed = start + k - 1
        proposed = tokens.tolist()  # every rank: the target's inputs need them on the host
        for n, row, k in zip(rows, proposed, row_widths):
            drafts[request_ids[picked[n]]] = row[:k]
        return drafts

    def _decode(
        self, states: list[WorkerRequestState], positions: np.ndarray, input_ids: torch.Tensor
    ) -> torch.Tensor:
        """One token per request: ``input_ids`` (on the device) at ``positions``."""
        counts = np.ones(len(states), dtype=np.int64)
        layout = varlen_layout(counts, positions, [s.block_ids for s in states], self.block_size)
        layout.stage(self.staging)
        on_device = self.staging.to_device()
        return self._forward(
            input_ids, layout.device_positions(on_device), layout.metadata(on_device)
        )

    def _forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        """The draft's forward pass: its decode graph when one fits, else eagerly."""
        graphs = self.graphs
        key = graphs.key_for(metadata.seq_lens.shape[0], input_ids.shape[0]) if graphs else None
        if key is not None:
            return graphs.run(key, input_ids, positions, metadata)
        return self.model(input_ids, positions, metadata)

    def _greedy(self, hidden: torch.Tensor, num_rows: int) -> torch.Tensor:
        """The argmax of each row's draft logits, chosen by the driver, on every rank."""
        logits = self.model.compute_logits(hidden)
        if logits is None:  # a worker rank: the driver picks
            tokens = torch.empty(num_rows, dtype=torch.int64, device=self.device)
        else:
            tokens = logits.argmax(dim=-1)
        return get_tp_group().broadcast(tokens)

    def capture_cuda_graphs(
        self, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int
    ) -> None:
        """Decode graphs for the draft's single-token passes (and catch-up passes of decode
        rows); its mirrored prompt chunks run eagerly."""
        self.graphs = StepGraphs(
            self.model, max_num_seqs, max_num_batched_tokens, max_model_len, self.block_size,
            self.device, mixed=False,
        )  # fmt: skip
        self.graphs.capture()

    def profile_run(self, num_rows: int, max_model_len: int) -> None:
        """The draft's largest pass and logits rows, for the memory profile."""
        num_tokens = self.max_pass_tokens
        input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        positions = torch.arange(num_tokens, device=self.device) % max_model_len
        hidden = self.model(input_ids, positions, None)
        self.model.compute_logits(hidden[: min(num_rows, num_tokens)])

    def release(self) -> None:
        """Drop the draft's CUDA graphs and the model now (see ``Worker.shutdown``)."""
        if self.graphs is not None:
            self.graphs.release()
        self.graphs = None
        self.model = None
