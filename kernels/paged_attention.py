"""Paged attention over a flattened varlen batch that mixes prefill chunks and decodes.

Inputs (the engine's attention metadata):
- ``query`` ``[num_tokens, num_heads, head_dim]``: the step's queries, request after request;
  request ``b`` owns rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``.
- ``seq_lens[b]``: the request's context length *after* this step (cached tokens plus the
  new ones). Its new tokens sit at absolute positions ``seq_lens[b] - q_len_b ... seq_lens[b]-1``
  and attend causally: query at position ``p`` sees keys ``0..p``.
- ``block_tables[b, i]``: physical block holding the request's tokens
  ``i*block_size .. (i+1)*block_size-1``; entries past the context are ignored.
- Caches in the layout of :mod:`metroline.kernels.kv_cache`; the step's new K/V are already
  written there. GQA: query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)``.
"""

from __future__ import annotations

import torch


def paged_attention_ref(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    cu_seqlens_q: torch.Tensor,  # [num_seqs + 1] int32
    scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
) -> torch.Tensor:
    """Reference: gather each request's K/V, causal softmax in fp32, one request at a time."""
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(query)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        q_start, q_end = cu[b], cu[b + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        num_blocks = (seq_len + block_size - 1) // block_size
        blocks = block_tables[b, :num_blocks].long()
        k = key_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        v = value_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        k = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, S, D]
        v = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
        q = query[q_start:q_end].float().transpose(0, 1)  # [H, Q, D]
        scores = torch.matmul(q, k.transpose(1, 2)) * scale  # [H, Q, S]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
        k_pos = torch.arange(seq_len, device=query.device)
        mask = k_pos[None, :] > q_pos[:, None]
        scores.masked_fill_(mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q_start:q_end] = torch.matmul(probs, v).transpose(0, 1).to(out.dtype)
    return out
