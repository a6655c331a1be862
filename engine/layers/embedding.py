"""Vocabulary-parallel embedding and LM head.

The vocabulary is padded to a multiple of the TP size and split in contiguous ranges: rank
``r`` holds rows ``[r*V_local, (r+1)*V_local)``. Padding rows are zero and are cut from the
logits, so they can never be sampled.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import get_tp_group
from .weights import read_narrow, source_shape


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, embedding_dim: int) -> None:
        super().__init__()
        self.tp_group = get_tp_group()
        self.tp_rank, self.tp_size = self.tp_group.rank, self.tp_group.world_size
        self.vocab_size = vocab_size
        self.vocab_per_rank = -(-vocab_size // self.tp_size)
        self.vocab_start = self.tp_rank * self.vocab_per_rank
        self.vocab_end = min(self.vocab_start + self.vocab_per_rank, vocab_size)
        self.weight = nn.Parameter(
            torch.empty(self.vocab_per_rank, embedding_dim), requires_grad=False
        )
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, source: Any, shard_id: Any = None) -> None:
        del shard_id
        shape = source_shape(source)
        if shape != (self.vocab_size, param.shape[1]):
            raise ValueError(
                f"embedding has shape {shape}, expected {(self.vocab_size, param.shape[1])}"
            )
        rows = self.vocab_end - self.vocab_start
        param.data[rows:].zero_()
        param.data[:rows].copy_(read_narrow(source, 0, self.vocab_start, rows))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local_ids = torch.where(outside, 0, input_ids - self.vocab_start)
        embedded = F.embedding(local_ids, self.weight)
        embedded.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp_group.all_reduce(embedded)


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to the vocabulary. Full logits land on rank 0 (which samples);
    the other ranks get ``None``. Every rank must call it, in the same order."""

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = self.tp_group.gather(F.linear(hidden_states, self.weight), dim=-1)
        return logits[..., : self.vocab_size] if logits is not None else None
