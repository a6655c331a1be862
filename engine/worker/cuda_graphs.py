"""CUDA graphs for engine steps: forward passes captured at start-up, replayed on new inputs.

Two families share one memory pool and one set of persistent input buffers:

- **Decode graphs**, one per batch-size bucket, for steps in which every scheduled request
  computes exactly one token (decodes, and prompt chunks of one token). Rows past the real
  batch are padding requests of one token: their KV writes are skipped (slot -1), their
  outputs ignored.
- **Mixed-step graphs**, one per token-count bucket up to ``MIXED_MAX_TOKENS``, for any other
  step (prompt chunks beside decodes). Attention runs the searched grid over all
  ``max_num_seqs`` request rows: rows past the real requests own no query tokens (their
  ``cu_seqlens_q`` entries repeat the real token count), so their programs exit at once;
  tokens past the real ones belong to no request: their KV writes are skipped, their
  attention rows are never written and their outputs are ignored. Rows are independent in
  every other layer, so padding never reaches a real token. Captured with ``max_seqlen_q`` =
  the bucket, i.e. the largest prefill tile; an eager step of short chunks may take a smaller
  one, which computes the same values up to floating-point rounding. Attention runs as for a
  mixed step (``AttentionMetadata.mixed``): one-token requests in a launch of their own.

Attention is captured with ``max_seqlen_k = max_model_len``, so the split-KV layout fixed in
a graph is valid for any context the engine can hold. Mixed-step graphs remove the host's
launch cost (a Triton launch is tens of microseconds of Python), which bounds steps with a
prompt chunk at TP >= 2; at TP=1 the GPU bounds them and padding would only add work, so by
default they are captured only at TP >= 2 (``mixed_step_graphs`` overrides).
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import torch
from torch import nn

from ..layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)

#: Largest step a mixed-step graph covers; larger steps run eagerly, where the GPU's work
#: (a 4096-token step of llama3-8b is ~20 ms at TP=4) outweighs the host's launches.
MIXED_MAX_TOKENS = 4096

#: Largest batch a decode graph covers (the default max_num_seqs); larger decode steps run
#: eagerly. An eager step's launches cost the host about as long as the GPU work of a batch
#: of 512 to 1024, so graphs stopping at 512 left the GPU waiting in those steps; each
#: graph costs start-up time and pool memory (docs/performance.md).
DECODE_MAX_BATCH = 1024

GraphKey = tuple[str, int]  # ("decode", batch) or ("mixed", tokens)


def batch_size_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to 256, then every 32: few graphs, little padding."""
    sizes = [1, 2, 4, 8, *range(16, 257, 16), *range(288, 1025, 32)]
    return [s for s in sizes if s < max_num_seqs] + [max_num_seqs]


def token_buckets(max_tokens: int) -> list[int]:
    """Every 64 tokens up to 1024, then every 128: fewer than 64 padding tokens per step up
    to 1024, fewer than 128 beyond. Empty below 2 tokens (no mixed step fits)."""
    if max_tokens < 2:
        return []
    sizes = [*range(64, 1025, 64), *range(1152, 4097, 128)]
    return [s for s in sizes if s < max_tokens] + [max_tokens]


def use_mixed_step_graphs(wanted: bool | None, tp_size: int, speculative: bool = False) -> bool:
    """Unset means on at TP >= 2, where the host bounds eager mixed steps (measured in
    docs/engine.md, "Model runner"), and with speculative decoding, which runs in the plain
    order: host time is not hidden, and steps mixing prompt chunks with verification are
    common (pure verification steps run as decode steps)."""
    if wanted is None:
        return tp_size >= 2 or speculative
    return wanted


def mixed_pool_bytes(activation_bytes: int, max_num_batched_tokens: int) -> int:
    """What the mixed-step graphs' pool will hold, to set aside before sizing the KV pool: the
    working set of their largest step, scaled from the profiled one at
    ``max_num_batched_tokens`` (activations grow with the token count; the profile's logits
    make this a slight overestimate)."""
    return int(activation_bytes * min(1.0, MIXED_MAX_TOKENS / max(1, max_num_batched_tokens)))


class StepGraphs:
    """Invariants: decode graph ``b`` reads the first ``b`` rows of the token and request
    buffers with ``cu_decode = arange``; mixed graph ``t`` reads the first ``t`` token rows
    and all ``max_num_seqs`` request rows with ``cu_mixed``. Every graph copies its hidden
    states into the first rows of ``hidden`` (one buffer outside the graphs' pool, so no
    graph keeps an output of its own alive); the runner reads them, in stream order, before
    the next replay overwrites them."""

    def __init__(
        self,
        model: nn.Module,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        block_size: int,
        device: torch.device,
        mixed: bool,
    ) -> None:
        self.model = model
        self.max_model_len = max_model_len
        # A decode step has one token a row: never more rows than the token budget.
        largest = min(max_num_seqs, max_num_batched_tokens, DECODE_MAX_BATCH)
        self.decode_buckets = batch_size_buckets(largest)
        limit = min(max_num_batched_tokens, MIXED_MAX_TOKENS)
        self.mixed_buckets = token_buckets(limit) if mixed else []
        tokens = max([max_num_seqs, *self.mixed_buckets])
        max_blocks = -(-max_model_len // block_size)
        with torch.device(device):
            self.input_ids = torch.zeros(tokens, dtype=torch.int64)
            self.positions = torch.zeros(tokens, dtype=torch.int64)
            self.slot_mapping = torch.full((tokens,), -1, dtype=torch.int64)
            self.seq_lens = torch.ones(max_num_seqs, dtype=torch.int32)
            self.block_tables = torch.zeros((max_num_seqs, max_blocks), dtype=torch.int32)
            self.cu_decode = torch.arange(max_num_seqs + 1, dtype=torch.int32)
            self.cu_mixed = torch.zeros(max_num_seqs + 1, dtype=torch.int32)
            # Request rows past a step's real ones keep their own places, after the real ones.
            self.rows = torch.arange(max_num_seqs, dtype=torch.int32)
            self.seq_order = self.rows.clone()
        self.graphs: dict[GraphKey, torch.cuda.CUDAGraph] = {}
        self.hidden: torch.Tensor | None = None  # [max tokens, hidden], set at capture
        self.replays: Counter[str] = Counter()  # steps run per family ("decode", "mixed")

    def keys(self) -> list[GraphKey]:
        """Every graph, largest activations first (smaller ones then reuse the pool)."""
        mixed = [("mixed", t) for t in reversed(self.mixed_buckets)]
        return mixed + [("decode", b) for b in reversed(self.decode_buckets)]

    def _metadata(self, key: GraphKey) -> AttentionMetadata:
        kind, size = key
        if kind == "decode":
            return AttentionMetadata(
                slot_mapping=self.slot_mapping[:size],
                block_tables=self.block_tables[:size],
                seq_lens=self.seq_lens[:size],
                cu_seqlens_q=self.cu_decode[: size + 1],
                max_seqlen_q=1,
                max_seqlen_k=self.max_model_len,
                seq_order=self.seq_order[:size],
            )
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables,
            seq_lens=self.seq_lens,
            cu_seqlens_q=self.cu_mixed,
            max_seqlen_q=size,
            max_seqlen_k=self.max_model_len,
            mixed=True,  # whether a replay holds decodes is not known at capture
            seq_order=self.seq_order,
        )

    def allocate_output(self, sample: torch.Tensor) -> None:
        """Create ``hidden`` (once) with the width and dtype of a forward's ``sample`` output."""
        if self.hidden is None:
            self.hidden = sample.new_empty((self.input_ids.shape[0], sample.shape[1]))

    def forward(self, key: GraphKey) -> torch.Tensor:
        """The captured computation, run eagerly on the persistent buffers."""
        size = key[1]
        return self.model(self.input_ids[:size], self.positions[:size], self._metadata(key))

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every graph in one pool. Returns the seconds it took."""
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        # One eager run per class of sizes Triton compiles a variant for (1, a multiple of 16,
        # other), so nothing compiles or initialises (cuBLAS workspace) inside a capture;
        # running every bucket eagerly would double the capture time for nothing.
        warmed: set[tuple[str, bool, bool]] = set()
        for key in self.keys():
            size_class = (key[0], key[1] == 1, key[1] % 16 == 0)
            if size_class not in warmed:
                warmed.add(size_class)
                with torch.cuda.stream(stream):
                    sample = self.forward(key)
                torch.cuda.current_stream().wait_stream(stream)
                self.allocate_output(sample)
                del sample
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.hidden[: key[1]].copy_(self.forward(key))
            self.graphs[key] = graph
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        mixed = self.mixed_buckets
        logger.info(
            "captured %d CUDA graphs: %d decode (batch 1..%d)%s in %.1f s",
            len(self.graphs),
            len(self.decode_buckets),
            self.decode_buckets[-1],
            f", {len(mixed)} mixed-step (tokens 2..{mixed[-1]})" if mixed else "",
            seconds,
        )
        return seconds

    def key_for(self, num_seqs: int, num_tokens: int) -> GraphKey | None:
        """The graph that can run this step, or None (run it eagerly)."""
        if not self.graphs:
            return None
        if num_tokens == num_seqs:
            if num_seqs <= self.decode_buckets[-1]:
                return "decode", next(b for b in self.decode_buckets if b >= num_seqs)
            return None
        if self.mixed_buckets and num_tokens <= self.mixed_buckets[-1]:
            return "mixed", next(t for t in self.mixed_buckets if t >= num_tokens)
        return None

    def run(
        self,
        key: GraphKey,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Copy the step's inputs into the buffers, replay ``key``'s graph; returns the real
        tokens' hidden states ``[num_tokens, hidden]``."""
        kind, size = key
        num_tokens, num_seqs = input_ids.shape[0], metadata.seq_lens.shape[0]
        self.input_ids[:num_tokens].copy_(input_ids)
        self.positions[:num_tokens].copy_(positions)
        self.slot_mapping[:num_tokens].copy_(metadata.slot_mapping)
        if size > num_tokens:
            self.slot_mapping[num_tokens:size].fill_(-1)
        self.seq_lens[:num_seqs].copy_(metadata.seq_lens)
        order = self.rows[:num_seqs] if metadata.seq_order is None else metadata.seq_order
        self.seq_order[:num_seqs].copy_(order)
        rows = size if kind == "decode" else self.rows.shape[0]  # the rows the graph reads
        if rows > num_seqs:
            self.seq_order[num_seqs:rows].copy_(self.rows[num_seqs:rows])
        width = metadata.block_tables.shape[1]
        self.block_tables[:num_seqs, :width].copy_(metadata.block_tables)
        if kind == "decode":
            if size > num_seqs:
                self.seq_lens[num_seqs:size].fill_(1)
        else:
            self.cu_mixed[: num_seqs + 1].copy_(metadata.cu_seqlens_q)
            # Request rows past the real ones own no tokens.
            self.cu_mixed[num_seqs + 1 :].fill_(num_tokens)
        self.replay(key)
        self.replays[kind] += 1
        return self.hidden[:num_tokens]

    def replay(self, key: GraphKey) -> None:
        self.graphs[key].replay()

    def release(self) -> None:
        """Drop every graph, the output buffer and the model now. Graphs hold captured
        collectives: destroyed after the process group (say, by a caller still referencing
        this object), they abort the process at exit."""
        self.graphs.clear()
        self.hidden = None
        self.model = None
