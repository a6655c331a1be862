"""``allowed_token_ids``, ``logit_bias``, bad words and min-tokens bans as device tensors.

Each request's fixed constraints are built ONCE, when the worker first sees the request
(:func:`request_constraints`), as device tensors held by its
:class:`~.step_inputs.WorkerRequestState`; a step only gathers the tensors of the rows that
have any (:func:`plan_step_constraints` and :meth:`StepConstraints.to_device`): a stack or a
concatenation on the device, plus a few row-sized index arrays through the step's staging.
Nothing vocabulary-sized or id-list-sized is flattened in Python or staged per step; only the
bans of bad words of several tokens, which depend on the output so far, are found on the host
each step (at most two variants of :data:`~..sampling_params.MAX_BAD_WORDS` words per row).

Host-to-device copies at arrival go through pinned memory with ``non_blocking=True``, so
they never wait for the step running on the device. The pinned source comes from PyTorch's
caching host allocator (``Tensor.pin_memory()``), which records the copy's event and reuses
the block only once the copy has completed, so dropping the host tensor at once is safe.

Memory bound: state exists only for the requests the worker runs (it is dropped when a
request finishes or is preempted, and rebuilt when it resumes), at most ``max_num_seqs`` of
them. Each holds at most one ``vocab_size``-byte bool row (``allowed_token_ids``), at most
:data:`~..sampling_params.MAX_LOGIT_BIAS_ENTRIES` (id, bias) pairs and its single-token
bans (int64): under ``max_num_seqs * (vocab_size + 12 * MAX_LOGIT_BIAS_ENTRIES + 16 * (2 *
MAX_BAD_WORDS + MAX_STOP_TOKEN_IDS + len(eos)))`` bytes in all, whatever the requests ask.
A step adds at most ``rows x vocab_size`` bytes (the stacked rows), a quarter of its fp32
logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..sampling_params import SamplingParams


def device_tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` on ``device``; on a GPU through pinned memory, without a host sync."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


@dataclass(slots=True)
class RequestConstraints:
    """One request's fixed logits constraints, on the device (``None``: the request has
    none of that kind)."""

    #: [V] bool: True for every token ``allowed_token_ids`` leaves out.
    disallowed: torch.Tensor | None = None
    bias_ids: torch.Tensor | None = None  # [E] int64, the ``logit_bias`` keys
    bias_values: torch.Tensor | None = None  # [E] fp32, their biases
    #: [S] int64: the single-token bad words, banned at every step.
    bans: torch.Tensor | None = None
    #: [S + M] int64: ``bans`` plus EOS and stop ids, banned while output < ``min_tokens``.
    min_tokens_bans: torch.Tensor | None = None
    min_tokens: int = 0
    #: Bad words of several tokens: their last token is banned after the others.
    multi_token_words: tuple[tuple[int, ...], ...] = ()

    def bans_now(self, num_output_tokens: int) -> torch.Tensor | None:
        if num_output_tokens < self.min_tokens and self.min_tokens_bans is not None:
            return self.min_tokens_bans
        return self.bans


def request_constraints(
    params: SamplingParams,
    eos_token_ids: tuple[int, ...],
    bad_words_token_ids: tuple[tuple[int, ...], ...],
    vocab_size: int,
    device: torch.device,
) -> RequestConstraints | None:
    """The request's constraints as device tensors; ``None`` when it has none (the
    common case, which then costs nothing per step)."""
    single = sorted({w[0] for w in bad_words_token_ids if len(w) == 1 and w[0] < vocab_size})
    min_tokens_ids: list[int] = []
    if params.min_tokens > 0:
        ends = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        min_tokens_ids = sorted({t for t in ends if t < vocab_size} - set(single))
    multi = tuple(w for w in bad_words_token_ids if len(w) > 1)
    allowed = params.allowed_token_ids
    bias = params.logit_bias
    if not (single or min_tokens_ids or multi or allowed is not None or bias):
        return None
    constraints = RequestConstraints(min_tokens=params.min_tokens, multi_token_words=multi)
    if allowed is not None:
        disallowed = torch.ones(vocab_size, dtype=torch.bool, device=device)
        disallowed[device_tensor(list(allowed), torch.int64, device)] = False
        constraints.disallowed = disallowed
    if bias:
        constraints.bias_ids = device_tensor(list(bias), torch.int64, device)
        constraints.bias_values = device_tensor(list(bias.values()), torch.float32, device)
    if single:
        constraints.bans = device_tensor(single, torch.int64, device)
    if min_tokens_ids:
        constraints.min_tokens_bans = device_tensor(single + min_tokens_ids, torch.int64, device)
    return constraints


def multi_token_bans(
    words: tuple[tuple[int, ...], ...], token_ids: list[int], num_output_tokens: int
) -> list[int]:
    """Last tokens of the ``words`` (each of several tokens) whose other tokens end the
    output now."""
    banned = []
    for word in words:
        *prefix, last = word
        if len(prefix) <= num_output_tokens and token_ids[-len(prefix) :] == prefix:
            banned.append(last)
    return sorted(set(banned))


@dataclass
class StepConstraints:
    """The constrained rows of one step and the staging columns of their row indices."""

    disallowed: list[torch.Tensor] = field(default_factory=list)
    bans: list[torch.Tensor] = field(default_factory=list)
    bias_ids: list[torch.Tensor] = field(default_factory=list)
    bias_values: list[torch.Tensor] = field(default_factory=list)
    #: Staging column indices: name -> index (see :func:`plan_step_constraints`).
    columns: dict[str, int] = field(default_factory=dict)
    num_bans: int = 0
    num_bias: int = 0
    num_dynamic_bans: int = 0

    def to_device(
        self, staged: list[torch.Tensor], num_rows: int, vocab_size: int, device: torch.device
    ) -> tuple[
        torch.Tensor | None,
        tuple[torch.Tensor, torch.Tensor] | None,
        tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    ]:
        """(disallowed mask [B, V], bans (rows, ids), logit bias (rows, ids, values)), each
        ``None`` when no row has it; device work only, no host sync."""
        column = {name: staged[index] for name, index in self.columns.items()}
        mask = None
        if self.disallowed:
            stacked = torch.stack(self.disallowed)
            if len(self.disallowed) == num_rows:  # every row, in order
                mask = stacked
            else:
                mask = torch.zeros(num_rows, vocab_size, dtype=torch.bool, device=device)
                mask[column["disallowed_rows"]] = stacked
        bans = None
        if self.bans or self.num_dynamic_bans:
            rows, ids = [], []
            if self.bans:
                counts = column["ban_counts"]
                rows.append(_repeat_rows(column["ban_rows"], counts, self.num_bans))
                ids += self.bans
            if self.num_dynamic_bans:
                rows.append(column["dynamic_ban_rows"])
                ids.append(column["dynamic_ban_ids"])
            bans = (torch.cat(rows), torch.cat(ids))
        bias = None
        if self.bias_ids:
            rows = _repeat_rows(column["bias_rows"], column["bias_counts"], self.num_bias)
            bias = (rows, torch.cat(self.bias_ids), torch.cat(self.bias_values))
        return mask, bans, bias


def _repeat_rows(rows: torch.Tensor, counts: torch.Tensor, total: int) -> torch.Tensor:
    # output_size spares the device-to-host read of the total.
    return torch.repeat_interleave(rows, counts, output_size=total)


def plan_step_constraints(
    constrained: list[tuple[int, RequestConstraints, list[int], int]],
    add: Callable[[list, torch.dtype], int],
) -> StepConstraints:
    """``constrained``: (row, constraints, token ids, number of output tokens) of each row
    with constraints, in row order. Queues the row-index columns with ``add``."""
    step = StepConstraints()
    disallowed_rows, ban_rows, ban_counts, bias_rows, bias_counts = [], [], [], [], []
    dynamic_rows: list[int] = []
    dynamic_ids: list[int] = []
    for row, constraints, token_ids, num_output in constrained:
        if constraints.disallowed is not None:
            disallowed_rows.append(row)
            step.disallowed.append(constraints.disallowed)
        bans = constraints.bans_now(num_output)
        if bans is not None:
            ban_rows.append(row)
            ban_counts.append(bans.shape[0])
            step.bans.append(bans)
        if constraints.bias_ids is not None:
            bias_rows.append(row)
            bias_counts.append(constraints.bias_ids.shape[0])
            step.bias_ids.append(constraints.bias_ids)
            step.bias_values.append(constraints.bias_values)
        if constraints.multi_token_words:
            banned = multi_token_bans(constraints.multi_token_words, token_ids, num_output)
            dynamic_rows += [row] * len(banned)
            dynamic_ids += banned
    columns = step.columns
    if disallowed_rows:
        columns["disallowed_rows"] = add(disallowed_rows, torch.int64)
    if ban_rows:
        columns["ban_rows"] = add(ban_rows, torch.int64)
        columns["ban_counts"] = add(ban_counts, torch.int64)
        step.num_bans = sum(ban_counts)
    if dynamic_ids:
        columns["dynamic_ban_rows"] = add(dynamic_rows, torch.int64)
        columns["dynamic_ban_ids"] = add(dynamic_ids, torch.int64)
        step.num_dynamic_bans = len(dynamic_ids)
    if bias_rows:
        columns["bias_rows"] = add(bias_rows, torch.int64)
        columns["bias_counts"] = add(bias_counts, torch.int64)
        step.num_bias = sum(bias_counts)
    return step
