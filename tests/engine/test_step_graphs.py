"""Step CUDA graphs: bucket rules, and the padded inputs a graph replays on (the decode order
of a step's requests among them).

CUDA graphs cannot be captured on the CPU, so these tests install a ``StepGraphs`` whose
replay runs the captured computation eagerly on the persistent, padded buffers: everything
a graph would compute (padding requests, padding tokens, the graph's attention bounds) is
exercised; only the capture itself is left to the GPU checks.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from metroline.engine import LLM, SamplingParams
from metroline.engine.layers.attention import AttentionMetadata
from metroline.engine.worker.cuda_graphs import (
    MIXED_MAX_TOKENS,
    StepGraphs,
    mixed_pool_bytes,
    token_buckets,
    use_mixed_step_graphs,
)
from metroline.engine.worker.host_staging import StepStaging
from metroline.engine.worker.step_inputs import varlen_layout

from .conftest import MAX_NEW_TOKENS, make_prompts, shared_prefix_prompts


class EagerReplayGraphs(StepGraphs):
    """Replays by running the captured computation on the buffers."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.graphs = dict.fromkeys(self.keys())  # "captured": key_for() may pick any

    def replay(self, key) -> None:
        hidden = self.forward(key)
        self.allocate_output(hidden)
        self.hidden[: key[1]].copy_(hidden)


def test_token_buckets():
    buckets = token_buckets(MIXED_MAX_TOKENS)
    assert buckets == sorted(set(buckets)) and buckets[-1] == MIXED_MAX_TOKENS
    for tokens in range(2, MIXED_MAX_TOKENS + 1):
        bucket = next(b for b in buckets if b >= tokens)
        assert bucket - tokens < (64 if tokens <= 1024 else 128)
    assert token_buckets(7) == [7] and token_buckets(1) == []
    assert use_mixed_step_graphs(None, 1) is False and use_mixed_step_graphs(None, 2) is True
    assert use_mixed_step_graphs(True, 1) is True and use_mixed_step_graphs(False, 4) is False
    assert use_mixed_step_graphs(None, 1, speculative=True) is True
    assert use_mixed_step_graphs(False, 1, speculative=True) is False


def test_mixed_pool_reserve_scales_the_profiled_activations():
    assert mixed_pool_bytes(1000, 8192) == 1000 * MIXED_MAX_TOKENS // 8192
    assert mixed_pool_bytes(1000, 2048) == 1000  # the largest graph is the whole budget


def test_key_for_picks_the_smallest_bucket():
    graphs = EagerReplayGraphs(torch.nn.Identity(), 20, 300, 64, 16, torch.device("cpu"), True)
    assert graphs.key_for(5, 5) == ("decode", 8)
    assert graphs.key_for(20, 20) == ("decode", 20)
    assert graphs.key_for(3, 70) == ("mixed", 128)
    assert graphs.key_for(3, 300) == ("mixed", 300)
    assert graphs.key_for(3, 301) is None  # larger than any bucket: eager
    plain = EagerReplayGraphs(torch.nn.Identity(), 20, 300, 64, 16, torch.device("cpu"), False)
    assert plain.key_for(3, 70) is None and plain.key_for(4, 4) == ("decode", 4)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_padded_graph_inputs_give_transformers_tokens(arch, tiny_checkpoint, hf_greedy):
    """Prompt chunks beside decodes, prefix hits and preemption, every step through the
    padded buffers (decode and mixed-step graphs): greedy tokens equal transformers'."""
    path = tiny_checkpoint(arch)
    prompts = make_prompts() + shared_prefix_prompts()[:3]
    probe = LLM(model=str(path), max_model_len=128, kv_cache_memory_bytes=4 * 2**20)
    per_block = probe.engine_core.executor.worker.bytes_per_block()
    probe.shutdown()
    llm = LLM(
        model=str(path),
        max_model_len=128,
        kv_cache_memory_bytes=14 * per_block,
        max_num_seqs=6,
        max_num_batched_tokens=40,
        enable_prefix_caching=True,
    )
    runner = llm.engine_core.executor.worker.model_runner
    graphs = EagerReplayGraphs(runner.model, 6, 40, 128, 16, torch.device("cpu"), mixed=True)
    runner.step_graphs = graphs
    greedy = SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS)
    outputs = llm.generate(prompts, greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(path, prompts)
    stats = llm.engine_core.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert graphs.replays["mixed"] > 0 and graphs.replays["decode"] > 0
    # Every step went through a graph: none is larger than the biggest bucket.
    assert sum(graphs.replays.values()) == stats.num_steps


def test_shutdown_releases_graphs_a_caller_still_holds(tiny_checkpoint):
    """Graphs hold captured collectives and the model: shutdown drops them even while some
    other object still references the StepGraphs (a TP process aborted at exit otherwise)."""
    llm = LLM(model=str(tiny_checkpoint("llama")), kv_cache_memory_bytes=2**20)
    runner = llm.engine_core.executor.worker.model_runner
    graphs = EagerReplayGraphs(runner.model, 4, 64, 64, 16, torch.device("cpu"), mixed=True)
    runner.step_graphs = graphs
    llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    assert graphs.graphs and graphs.hidden is not None
    llm.shutdown()
    assert not graphs.graphs and graphs.hidden is None and graphs.model is None


class OrderRecorder(torch.nn.Module):
    """A model that records the decode order each forward is given."""

    def __init__(self) -> None:
        super().__init__()
        self.orders: list[list[int]] = []

    def forward(self, input_ids, positions, metadata):
        self.orders.append(metadata.seq_order.tolist())
        return torch.zeros(input_ids.shape[0], 4)


@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_graph_buffers_take_the_steps_order(kind):
    """The step's order of its requests fills the graph's buffer; padding requests follow in
    their own places, so the graph's launch reads a permutation of all its rows. A step
    without an order replays in the rows' own order."""
    model = OrderRecorder()
    graphs = EagerReplayGraphs(model, 20, 300, 64, 16, torch.device("cpu"), True)
    num_seqs, size = 5, 8
    tokens = num_seqs if kind == "decode" else num_seqs + 3
    lens = torch.tensor([4, 9, 2, 30, 7], dtype=torch.int32)
    metadata = AttentionMetadata(
        slot_mapping=torch.arange(tokens),
        block_tables=torch.zeros(num_seqs, 2, dtype=torch.int32),
        seq_lens=lens,
        cu_seqlens_q=torch.tensor([0, 1, 2, 3, 4, tokens], dtype=torch.int32),
        max_seqlen_q=1 if kind == "decode" else 4,
        max_seqlen_k=30,
        seq_order=torch.argsort(lens, descending=True, stable=True).to(torch.int32),
    )
    key = (kind, size if kind == "decode" else 16)
    ids = torch.zeros(tokens, dtype=torch.int64)
    graphs.run(key, ids, ids, metadata)
    graphs.run(key, ids, ids, dataclasses.replace(metadata, seq_order=None))
    rows = size if kind == "decode" else 20
    assert model.orders == [[3, 1, 4, 0, 2, *range(5, rows)], list(range(rows))]


def test_layout_orders_requests_longest_context_first():
    """The staged decode order: contexts longest first, ties in row order."""
    counts, starts = np.array([1, 1, 3, 1]), np.array([8, 20, 5, 19])
    layout = varlen_layout(counts, starts, [[0, 1], [2, 3], [4], [5, 6]], 16)
    staging = StepStaging(torch.device("cpu"))
    layout.stage(staging)
    metadata = layout.metadata(staging.to_device())
    assert metadata.seq_order.dtype == torch.int32
    assert metadata.seq_order.tolist() == [1, 3, 0, 2]  # lengths 21, 20, 9, 8
