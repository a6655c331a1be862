"""CUDA graphs for decode steps: one captured forward pass per batch-size bucket.

A step in which every scheduled request computes exactly one token (decodes, and prefill
chunks of one token) replays the graph of the smallest bucket that holds it. Inputs are
copied into persistent buffers; rows past the real batch are padding: their KV writes are
skipped (slot -1) and their outputs ignored. Attention is captured with
``max_seqlen_k = max_model_len``, so the split-KV layout fixed in the graph is valid for any
context the engine can hold.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from metroline.engine.attention_metadata import AttentionMetadata

logger = logging.getLogger(__name__)


def batch_size_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to 256, then every 32: few graphs, little padding."""
    sizes = [1, 2, 4, 8, *range(16, 257, 16), *range(288, 1025, 32)]
    return [s for s in sizes if s < max_num_seqs] + [max_num_seqs]


class DecodeGraphs:
    """Invariant: ``graphs[b]`` reads its inputs from the first ``b`` rows of the persistent
    buffers and writes hidden states to ``outputs[b]``."""

    def __init__(
        self,
        model: nn.Module,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.max_model_len = max_model_len
        self.buckets = batch_size_buckets(max_num_seqs)
        size = self.buckets[-1]
        max_blocks = -(-max_model_len // block_size)
        with torch.device(device):
            self.input_ids = torch.zeros(size, dtype=torch.int64)
            self.positions = torch.zeros(size, dtype=torch.int64)
            self.slot_mapping = torch.full((size,), -1, dtype=torch.int64)
            self.seq_lens = torch.ones(size, dtype=torch.int32)
            self.cu_seqlens_q = torch.arange(size + 1, dtype=torch.int32)
            self.block_tables = torch.zeros((size, max_blocks), dtype=torch.int32)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def _metadata(self, batch: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch],
            block_tables=self.block_tables[:batch],
            seq_lens=self.seq_lens[:batch],
            cu_seqlens_q=self.cu_seqlens_q[: batch + 1],
            max_seqlen_q=1,
            max_seqlen_k=self.max_model_len,
        )

    def _forward(self, batch: int) -> torch.Tensor:
        return self.model(self.input_ids[:batch], self.positions[:batch], self._metadata(batch))

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every bucket, largest first (smaller graphs reuse its memory pool).
        Returns the seconds it took."""
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        for batch in reversed(self.buckets):
            with torch.cuda.stream(stream):
                self._forward(batch)  # compile and warm up outside the graph
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.outputs[batch] = self._forward(batch)
            self.graphs[batch] = graph
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        logger.info(
            "captured %d decode graphs (batch 1..%d) in %.1f s",
            len(self.graphs),
            self.max_batch,
            seconds,
        )
        return seconds

    def can_run(self, num_seqs: int, num_tokens: int) -> bool:
        return num_tokens == num_seqs <= self.max_batch and bool(self.graphs)

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        """Replay for a one-token-per-request step; returns ``[num_seqs, hidden]``."""
        batch = input_ids.shape[0]
        bucket = next(b for b in self.buckets if b >= batch)
        self.input_ids[:batch].copy_(input_ids)
        self.positions[:batch].copy_(positions)
        self.slot_mapping[:batch].copy_(metadata.slot_mapping)
        self.seq_lens[:batch].copy_(metadata.seq_lens)
        if bucket > batch:
            self.slot_mapping[batch:bucket].fill_(-1)
            self.seq_lens[batch:bucket].fill_(1)
        width = metadata.block_tables.shape[1]
        self.block_tables[:batch, :width].copy_(metadata.block_tables)
        self.graphs[bucket].replay()
        return self.outputs[bucket][:batch]
