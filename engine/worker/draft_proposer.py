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
KV of the tokens the request had (or was drafting) when it wrote them; the valid prefix at a
step is ``min(num_draft_computed, num_computed_tokens)``, as the target accepted at most the
drafts it verified. A request whose every draft was accepted therefore recomputes one token
(the last draft's). Where a request stops right after such a step, the block holding that
token may enter the prefix cache with the draft's KV of that one position missing: a request
that reuses the block then drafts from it, which only ever lowers acceptance, never changes
what the target emits (drafts are proposals; verification decides).

Drafts are the draft model's argmax (a one-hot proposal, which is what the verifier's
rejection sampling assumes). If proposing raises, the step verifies placeholder drafts
instead (all rejected, so the output is unchanged) and the error is logged.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch
from torch import nn

from .. import faults
from ..distributed import get_tp_group
from ..messages import SchedulerOutput
from .cuda_graphs import StepGraphs
from .host_staging import StepStaging
from .step_inputs import MAX_DECODE_ROW_QUERIES, WorkerRequestState, varlen_layout

logger = logging.getLogger(__name__)


class DraftProposer:
    """Runs ``model`` (the draft) on this rank; every rank runs the same passes, the driver
    picks the tokens and broadcasts them."""

    def __init__(self, model: nn.Module, block_size: int, device: torch.device) -> None:
        self.model = model
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
        step_states = [states[r] for r in request_ids]
        widths = [len(spec.get(r, ())) for r in request_ids]
        ends = [
            s.num_computed_tokens + scheduled.num_scheduled_tokens[r] - k
            for r, s, k in zip(request_ids, step_states, widths)
        ]
        starts = [min(s.num_draft_computed, s.num_computed_tokens) for s in step_states]
        chunks = [s.token_ids[a:b] for s, a, b in zip(step_states, starts, ends)]
        for request_id, chunk, start, end in zip(request_ids, chunks, starts, ends):
            if len(chunk) != end - start or end <= start:
                raise RuntimeError(f"request {request_id} is missing input tokens")
        counts = np.fromiter(map(len, chunks), dtype=np.int64, count=len(chunks))
        layout = varlen_layout(
            counts, np.asarray(starts, dtype=np.int64), [s.block_ids for s in step_states],
            self.block_size,
        )  # fmt: skip
        # Drafting rows, longest drafts first: pass j runs the first rows with k > j.
        rows = sorted((i for i, k in enumerate(widths) if k), key=lambda i: -widths[i])
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
        for state, end in zip(step_states, ends):
            state.num_draft_computed = end
        if not rows:
            return {}
        width = max(widths)
        tokens = torch.zeros((len(rows), width), dtype=torch.int64, device=self.device)
        tokens[:, 0] = self._greedy(hidden[on_device[rows_at]], len(rows))
        drafting = [step_states[i] for i in rows]
        positions = np.asarray([ends[i] for i in rows], dtype=np.int64)  # of draft 1
        for j in range(1, width):
            active = sum(1 for i in rows if widths[i] > j)
            inputs = tokens[:active, j - 1]
            hidden = self._decode(drafting[:active], positions[:active] + j - 1, inputs)
            tokens[:active, j] = self._greedy(hidden, active)
        for i, state in zip(rows, drafting):
            state.num_draft_computed = ends[i] + widths[i] - 1
        proposed = tokens.tolist()  # every rank: the target's inputs need them on the host
        return {request_ids[i]: proposed[n][: widths[i]] for n, i in enumerate(rows)}

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

    def _forward(self, input_ids, positions, metadata) -> torch.Tensor:
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

    def profile_run(self, num_tokens: int, num_rows: int, max_model_len: int) -> None:
        """The draft's largest pass and logits rows, for the memory profile."""
        input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        positions = torch.arange(num_tokens, device=self.device) % max_model_len
        hidden = self.model(input_ids, positions, None)
        self.model.compute_logits(hidden[: min(num_rows, num_tokens)])

    def release(self) -> None:
        if self.graphs is not None:
            self.graphs.release()
        self.graphs = None
        self.model = None
