"""Compile, before serving, every kernel variant that serving can launch.

Triton compiles a kernel the first time it meets a new combination of compile-time values.
Left to chance, that happens mid-serving, when a step first meets a new tile shape or split
count: a stall for every request in that step (docs/engine.md, "Kernel warm-up", has the
measurements). The attention
launchers take every size that changes from step to step as a runtime value, so the variants
are fixed by the tile shapes (:func:`attention_config`), whether a context is split, and the
power of two that bounds the split count in the merge kernel. :func:`warm_up_attention`
launches each of them once on the real cache, reading block 0 and writing scratch outputs.

With an fp8 cache the variants follow the query's dtype, the FP8 switch and the fp8 tile rules
(pass the query dtype and the scales).

The elementwise kernels (RMSNorm, SiLU-and-mul, fp8 activation quantization) have one
variant per model shape; the engine's memory-profiling pass already compiles them. The RoPE +
KV-write launch needs the cache, which that pass runs without: :func:`warm_up_rotary_kv`
compiles it.
"""

from __future__ import annotations

import logging
import time

import torch
import triton

from . import (
    activation,
    fp8_gemm,
    fp8_quant,
    kv_cache,
    paged_attention,
    rmsnorm,
    rotary,
    rotary_kv,
    split_kv,
)
from .attention_tiles import AttentionConfig, attention_config
from .split_kv import merge_splits
from .utils import next_power_of_2

logger = logging.getLogger(__name__)

#: choose_num_splits never splits a context into more parts than this.
MAX_SPLITS = 64

_MODULES = (
    activation, fp8_gemm, fp8_quant, kv_cache, paged_attention, rmsnorm, rotary, rotary_kv,
    split_kv,
)  # fmt: skip


def compiled_variants() -> int:
    """How many kernel variants this process has compiled so far (all devices): a count that
    must not grow while serving once :func:`warm_up_attention` ran."""
    total = 0
    for module in _MODULES:
        for value in vars(module).values():
            if isinstance(value, triton.runtime.jit.JITFunction):
                for cache in getattr(value, "device_caches", {}).values():
                    total += len(cache[0])
    return total


def attention_configs(
    dtype: torch.dtype, head_dim: int, group: int, max_query_len: int, fp8_kv: bool = False
) -> list[tuple[int, AttentionConfig]]:
    """Every (query length, tile shape) pair the attention launcher picks, one query length
    per distinct variant: decodes (one query token, a dense grid) with few or many programs,
    and prompt chunks (a searched grid) of each tile height up to ``max_query_len`` tokens."""
    found: dict[tuple[AttentionConfig, bool], int] = {}
    for few in (False, True):
        found.setdefault((attention_config(dtype, head_dim, group, 1, few, fp8_kv), False), 1)
    length = 2
    while length <= max_query_len:
        config = attention_config(dtype, head_dim, group, length, fp8_kv=fp8_kv)
        found.setdefault((config, True), length)
        if length == max_query_len:
            break
        length = min(2 * length, max_query_len)
    return [(length, config) for (config, _), length in found.items()]


@torch.inference_mode()
def warm_up_attention(
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,
    num_heads: int,
    max_query_len: int,
    *,
    query_dtype: torch.dtype | None = None,  # the model's dtype; defaults to the cache's
    k_scale: torch.Tensor | None = None,  # [num_kv_heads] fp32, fp8 caches only
    v_scale: torch.Tensor | None = None,  # [num_kv_heads] fp32, fp8 caches only
) -> float:
    """Compile every attention and merge variant for this cache, query dtype and head layout;
    returns the seconds taken. Reads the cache, never writes it. An fp8 cache needs the query
    dtype (the variants follow it) and the scales serving will pass."""
    started = time.perf_counter()
    before = compiled_variants()
    device = key_cache.device
    _, block_size, num_kv_heads, head_dim = key_cache.shape
    group = num_heads // num_kv_heads
    fp8 = kv_cache.is_fp8_kv(key_cache, k_scale, v_scale)
    if fp8 and query_dtype in (None, key_cache.dtype):
        raise ValueError("an fp8 KV cache is read by bf16/fp16/fp32 queries: pass query_dtype")
    dtype = query_dtype or key_cache.dtype
    for query_len, config in attention_configs(dtype, head_dim, group, max(1, max_query_len), fp8):
        seq_len = max(query_len, 2 * block_size)
        query = torch.zeros(query_len, num_heads, head_dim, dtype=dtype, device=device)
        block_tables = torch.zeros(1, -(-seq_len // block_size), dtype=torch.int32, device=device)
        seq_lens = torch.tensor([seq_len], dtype=torch.int32, device=device)
        cu_seqlens_q = torch.tensor([0, query_len], dtype=torch.int32, device=device)
        for num_splits in (1, 2):
            paged_attention.paged_attention(
                query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, 1.0,
                query_len, seq_len, num_splits=num_splits, config=config,
                k_scale=k_scale, v_scale=v_scale,
            )  # fmt: skip
    block_s = 2
    while block_s <= MAX_SPLITS:
        split_out = torch.zeros(1, num_heads, block_s, head_dim, device=device)
        split_lse = torch.zeros(1, num_heads, block_s, device=device)
        out = torch.empty(1, num_heads, head_dim, dtype=dtype, device=device)
        cu_seqlens_q = torch.tensor([0, 1], dtype=torch.int32, device=device)
        merge_splits(split_out, split_lse, out, cu_seqlens_q, 1)
        block_s = next_power_of_2(block_s + 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    logger.info(
        "attention kernels ready: %d variants compiled in %.1f s",
        compiled_variants() - before,
        seconds,
    )
    return seconds


@torch.inference_mode()
def warm_up_rotary_kv(
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,
    num_heads: int,
    *,
    query_dtype: torch.dtype | None = None,  # the model's dtype; defaults to the cache's
    k_scale: torch.Tensor | None = None,  # [num_kv_heads] fp32, fp8 caches only
    v_scale: torch.Tensor | None = None,  # [num_kv_heads] fp32, fp8 caches only
) -> None:
    """Compile the RoPE + KV-write launches for this cache, query dtype and head layout, at
    negative slots, so the cache is never written: q, k and v as views into one buffer, as
    the QKV projection writes them, and q and k as tensors of their own, as a QK norm makes
    them; each for one token and for more (a one-token view's stride is its row's width, not
    the buffer's). Strides are specialised on divisibility by 16, which these can differ in."""
    device = key_cache.device
    _, _, num_kv_heads, head_dim = key_cache.shape
    fp8 = kv_cache.is_fp8_kv(key_cache, k_scale, v_scale)
    if fp8 and query_dtype in (None, key_cache.dtype):
        raise ValueError("an fp8 KV cache is written from bf16/fp16/fp32 keys: pass query_dtype")
    dtype = query_dtype or key_cache.dtype
    widths = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    cos_sin = torch.zeros(1, head_dim, dtype=torch.float32, device=device)
    for num_tokens in (1, 2):
        qkv = torch.zeros(num_tokens, sum(widths), dtype=dtype, device=device)
        q, k, v = (part.view(num_tokens, -1, head_dim) for part in qkv.split(widths, dim=-1))
        positions = torch.zeros(num_tokens, dtype=torch.int64, device=device)
        slots = torch.full((num_tokens,), -1, dtype=torch.int64, device=device)
        for query, key in ((q, k), (q.contiguous(), k.contiguous())):
            rotary_kv.rotary_and_write_kv(
                positions, query, key, v, cos_sin, key_cache, value_cache, slots, k_scale, v_scale
            )
