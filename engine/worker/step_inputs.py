"""Worker-side state of the requests it runs, and the tensors of one step built from it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from ..layers.attention import AttentionMetadata
from ..layers.sampler import SamplingMetadata
from ..messages import SchedulerOutput
from ..sampling_params import SamplingParams
from ..spec_decode.config import MAX_NUM_SPECULATIVE_TOKENS
from .host_staging import StepStaging
from .token_constraints import RequestConstraints, plan_step_constraints

#: Steps that verify drafts and whose requests each compute at most this many tokens run
#: their attention as one decode row per token (see :func:`build_step_inputs`).
MAX_DECODE_ROW_QUERIES = MAX_NUM_SPECULATIVE_TOKENS + 1


@dataclass(slots=True)
class WorkerRequestState:
    """What a worker knows of one request. Invariant: ``token_ids`` holds every token the
    scheduler has sent; the first ``num_computed_tokens`` of them have KV in ``block_ids``."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...]
    #: With a draft model: the positions whose draft KV it wrote (see
    #: :mod:`.draft_proposer`; valid up to ``min(this, num_computed_tokens)``).
    num_draft_computed: int = 0
    generator: torch.Generator | None = None
    #: Device tensors of ``allowed_token_ids``, ``logit_bias``, bad words and min-tokens
    #: bans, built once on arrival (None without any: see :mod:`.token_constraints`).
    constraints: RequestConstraints | None = None
    #: Prompt log-probs are still to be computed for the prompt chunks this worker runs
    #: (false once output exists: a resumed request's were delivered before).
    wants_prompt_logprobs: bool = False

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    attn_metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [num_rows] int64: rows whose logits are sampled
    sampled_request_ids: list[str] = field(default_factory=list)
    #: With speculative decoding: each sampled request's drafts (empty for most), in the
    #: order of ``sampled_request_ids``; a request with ``k`` drafts has ``k + 1`` rows in
    #: ``logits_indices`` (its next token's position, then each draft's). None: no drafts.
    drafts: list[list[int]] | None = None


@dataclass(slots=True)
class PreviousSample:
    """Tokens sampled by the step launched last, still on the device: a request scheduled
    again before they reach the host takes its next input token from here."""

    tokens: torch.Tensor  # [num_sampled] int64, on the device
    rows: dict[str, int]  # request id -> row of ``tokens``


def build_step_inputs(
    scheduled: SchedulerOutput,
    states: dict[str, WorkerRequestState],
    block_size: int,
    staging: StepStaging,
    previous: PreviousSample | None = None,
) -> StepInputs:
    """Flatten the scheduled requests (in scheduling order) into one varlen batch.

    Per request only the token ids and the block-table row are gathered in Python; positions
    and slots are computed for the whole step at once. A request whose last scheduled token
    is not in its state yet (sampled by the step in flight) gets it from ``previous`` on the
    device, without a host round trip. A request with drafts (``spec_token_ids``) feeds its
    next token then the drafts, and has a logits row at each of those positions; such a step
    (when no request computes more than :data:`MAX_DECODE_ROW_QUERIES` tokens) describes its
    attention as one decode row per token.
    """
    request_ids = list(scheduled.num_scheduled_tokens)
    step_states = [states[r] for r in request_ids]
    num_seqs = len(request_ids)
    counts = np.fromiter(
        (scheduled.num_scheduled_tokens[r] for r in request_ids), dtype=np.int64, count=num_seqs
    )
    starts = np.fromiter(
        (s.num_computed_tokens for s in step_states), dtype=np.int64, count=num_seqs
    )
    cu_seqlens = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(counts, out=cu_seqlens[1:])
    num_tokens = int(cu_seqlens[-1])
    chunks = []
    pending_slots, pending_rows = [], []
    spec = scheduled.spec_token_ids
    for row, (state, start, count) in enumerate(zip(step_states, starts.tolist(), counts.tolist())):
        drafts = spec.get(request_ids[row]) if spec else None
        if drafts:
            chunk = [*state.token_ids[start : start + count - len(drafts)], *drafts]
            if len(chunk) != count:
                raise RuntimeError(f"request {request_ids[row]} is missing input tokens")
        else:
            chunk = state.token_ids[start : start + count]
        if len(chunk) < count:  # the last token is still being sampled
            if previous is None or len(chunk) != count - 1:
                raise RuntimeError(f"request {request_ids[row]} is missing input tokens")
            pending_slots.append(int(cu_seqlens[row]) + count - 1)
            pending_rows.append(previous.rows[request_ids[row]])
            chunk = [*chunk, 0]
        chunks.append(chunk)
    input_ids = np.fromiter(itertools.chain.from_iterable(chunks), dtype=np.int64, count=num_tokens)
    layout = varlen_layout(counts, starts, [s.block_ids for s in step_states], block_size)
    sampling = set(scheduled.sampling_request_ids)
    sampled = np.fromiter((i for i, r in enumerate(request_ids) if r in sampling), dtype=np.int64)
    logits_indices = layout.cu_seqlens[1:][sampled] - 1
    step_drafts = None
    if spec:
        step_drafts = [spec.get(request_ids[i], []) for i in sampled.tolist()]
        rows_per_request = np.fromiter((len(d) + 1 for d in step_drafts), dtype=np.int64)
        # Request i's rows end at its last token: ends - (k_i, ..., 1, 0).
        ends = np.repeat(logits_indices, rows_per_request)
        back = np.repeat(np.cumsum(rows_per_request), rows_per_request) - 1
        logits_indices = ends - (back - np.arange(ends.shape[0]))
        if int(counts.max()) <= MAX_DECODE_ROW_QUERIES:
            layout = layout.as_decode_rows()
    layout.stage(staging)
    ids_at, rows_at = staging.add(input_ids, torch.int64), staging.add(logits_indices, torch.int64)
    if pending_slots:
        pending_at = staging.add(pending_slots, torch.int64), staging.add(pending_rows, torch.int64)
    on_device = staging.to_device()
    device_input_ids, logits_rows = on_device[ids_at], on_device[rows_at]
    if pending_slots:
        slots_of_pending, rows_of_pending = (on_device[i] for i in pending_at)
        device_input_ids[slots_of_pending] = previous.tokens[rows_of_pending]
    return StepInputs(
        input_ids=device_input_ids,
        positions=layout.device_positions(on_device),
        attn_metadata=layout.metadata(on_device),
        logits_indices=logits_rows,
        sampled_request_ids=[request_ids[i] for i in sampled.tolist()],
        drafts=step_drafts,
    )


@dataclass(slots=True)
class VarlenLayout:
    """Host arrays of one flattened batch: each token's position and KV slot, and the
    attention rows (one per request, or with :meth:`as_decode_rows` one per token)."""

    positions: np.ndarray  # [num_tokens] int64
    slot_mapping: np.ndarray  # [num_tokens] int64
    token_seq: np.ndarray  # [num_tokens] int64: the request row each token belongs to
    block_tables: np.ndarray  # [rows, max_blocks] int32
    seq_lens: np.ndarray  # [rows] int64: context of each attention row
    cu_seqlens: np.ndarray  # [rows + 1] int64: query tokens of each row
    max_seqlen_q: int

    def as_decode_rows(self) -> VarlenLayout:
        """The same batch with one attention row per token, attending to its own position
        and those before (exactly the causal rows of its request), so the decode kernels
        and decode CUDA graphs run it."""
        num_tokens = self.positions.shape[0]
        return VarlenLayout(
            positions=self.positions,
            slot_mapping=self.slot_mapping,
            token_seq=np.arange(num_tokens, dtype=np.int64),
            block_tables=self.block_tables[self.token_seq],
            seq_lens=self.positions + 1,
            cu_seqlens=np.arange(num_tokens + 1, dtype=np.int64),
            max_seqlen_q=1,
        )

    def stage(self, staging: StepStaging) -> None:
        """Queue the arrays for the staging's next copy; they must be its first queued
        (:meth:`metadata` and :meth:`device_positions` read them by index). The rows' order
        for the decode launches, longest context first, is computed here, on the host."""
        queued = [
            staging.add(self.slot_mapping, torch.int64),
            staging.add(self.block_tables, torch.int32),
            staging.add(self.seq_lens, torch.int32),
            staging.add(self.positions, torch.int64),
            staging.add(self.cu_seqlens, torch.int32),
            staging.add(np.argsort(-self.seq_lens, kind="stable"), torch.int32),
        ]
        if queued[0] != 0:
            raise RuntimeError("a varlen layout must be staged first")

    @staticmethod
    def device_positions(on_device: list[torch.Tensor]) -> torch.Tensor:
        """The positions among the tensors :meth:`stage` queued first."""
        return on_device[3]

    def metadata(self, on_device: list[torch.Tensor]) -> AttentionMetadata:
        """The attention metadata from the tensors :meth:`stage` queued first."""
        slots, tables, lens, _, cu_seqlens_q, seq_order = on_device[:6]
        return AttentionMetadata(
            slot_mapping=slots,
            block_tables=tables,
            seq_lens=lens,
            cu_seqlens_q=cu_seqlens_q,
            max_seqlen_q=self.max_seqlen_q,
            max_seqlen_k=int(self.seq_lens.max()),
            mixed=self.max_seqlen_q > 1 and bool((np.diff(self.cu_seqlens) == 1).any()),
            seq_order=seq_order,
        )


def varlen_layout(
    counts: np.ndarray, starts: np.ndarray, block_ids: list[list[int]], block_size: int
) -> VarlenLayout:
    """Request ``i`` computes ``counts[i]`` tokens from position ``starts[i]``, its KV in the
    blocks ``block_ids[i]``; positions and slots are computed for the whole batch at once."""
    num_seqs = counts.shape[0]
    cu_seqlens = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(counts, out=cu_seqlens[1:])
    num_tokens = int(cu_seqlens[-1])
    token_seq = np.repeat(np.arange(num_seqs), counts)
    positions = np.arange(num_tokens, dtype=np.int64) + np.repeat(starts - cu_seqlens[:-1], counts)
    block_tables = np.zeros((num_seqs, max(map(len, block_ids))), dtype=np.int32)
    for row, ids in enumerate(block_ids):
        block_tables[row, : len(ids)] = ids
    slot_mapping = (
        block_tables[token_seq, positions // block_size].astype(np.int64) * block_size
        + positions % block_size
    )
    return VarlenLayout(
        positions=positions,
        slot_mapping=slot_mapping,
        token_seq=token_seq,
        block_tables=block_tables,
        seq_lens=starts + counts,
        cu_seqlens=cu_seqlens,
        max_seqlen_q=int(counts.max()),
    )


def build_sampling_metadata(
    states: list[WorkerRequestState], vocab_size: int, staging: StepStaging
) -> SamplingMetadata:
    """The sampler's per-row parameters; the columns reach the device in one copy."""
    device = staging.device
    params = [s.sampling_params for s in states]
    num_rows = len(states)
    greedy = [p.greedy for p in params]
    columns: dict[str, int] = {}

    def column(name: str, values: list, dtype: torch.dtype = torch.float32) -> None:
        columns[name] = staging.add(values, dtype)

    # A top_k of the vocabulary size or more keeps every token: it is no filter.
    if any(0 < p.top_k < vocab_size and not p.greedy for p in params):
        top_k = [min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params]
        column("top_k", top_k, torch.int64)
    if any(p.top_p < 1 and not p.greedy for p in params):
        column("top_p", [p.top_p for p in params])
    if any(p.min_p > 0 and not p.greedy for p in params):
        column("min_p", [p.min_p for p in params])

    counts = prompt_mask = None
    if any(p.uses_penalties for p in params):
        column("presence", [p.presence_penalty for p in params])
        column("frequency", [p.frequency_penalty for p in params])
        column("repetition", [p.repetition_penalty for p in params])
        counts = torch.zeros(num_rows, vocab_size, dtype=torch.float32, device=device)
        prompt_mask = torch.zeros(num_rows, vocab_size, dtype=torch.bool, device=device)
        for row, state in enumerate(states):
            if not state.sampling_params.uses_penalties:
                continue
            outputs = state.output_token_ids
            if outputs:
                ids = torch.tensor(outputs, dtype=torch.int64, device=device)
                counts[row].scatter_add_(0, ids, torch.ones_like(ids, dtype=torch.float32))
            prompt = torch.tensor(
                state.token_ids[: state.num_prompt_tokens], dtype=torch.int64, device=device
            )
            prompt_mask[row, prompt] = True

    constrained = [
        (row, s.constraints, s.token_ids, len(s.token_ids) - s.num_prompt_tokens)
        for row, s in enumerate(states)
        if s.constraints is not None
    ]
    step_constraints = plan_step_constraints(constrained, staging.add) if constrained else None

    asked = [p.logprobs for p in params if p.logprobs is not None]
    column("temperature", [p.temperature for p in params])
    column("greedy", greedy, torch.bool)
    on_device = staging.to_device()
    tensors = {name: on_device[index] for name, index in columns.items()}
    allowed_mask = bans = logit_bias = None
    if step_constraints is not None:
        allowed_mask, bans, logit_bias = step_constraints.to_device(
            on_device, num_rows, vocab_size, device
        )
    return SamplingMetadata(
        temperature=tensors["temperature"],
        greedy=tensors["greedy"],
        all_greedy=all(greedy),
        top_k=tensors.get("top_k"),
        top_p=tensors.get("top_p"),
        min_p=tensors.get("min_p"),
        presence_penalty=tensors.get("presence"),
        frequency_penalty=tensors.get("frequency"),
        repetition_penalty=tensors.get("repetition"),
        output_token_counts=counts,
        prompt_token_mask=prompt_mask,
        generators={row: s.generator for row, s in enumerate(states) if s.generator is not None},
        max_num_logprobs=max(asked) if asked else None,
        allowed_token_mask=allowed_mask,
        token_bans=bans,
        logit_bias=logit_bias,
    )
