"""Launch shapes of :mod:`metroline.kernels.paged_attention`: the tile rules and the split rule.

Every shape these rules can return is a compiled variant that
:mod:`metroline.kernels.warmup` compiles before serving; the rules depend only on the model's
head layout, the dtype and the host-side bounds of a step, never on tensor contents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .utils import next_power_of_2


@dataclass(frozen=True, slots=True)
class AttentionConfig:
    """Launch shape. ``block_q * group <= block_m``; ``block_n`` keys per inner step."""

    block_m: int
    block_q: int
    block_n: int
    num_warps: int
    num_stages: int


#: Decode launches of fewer (request, KV head) programs than this per SM are ``few_programs``
#: (:func:`attention_config`); chosen by benchmarks/attention_sweep.py.
FEW_PROGRAMS_PER_SM = 8


def decode_has_few_programs(work_items: int, sms: int) -> bool:
    """Whether a decode launch of ``work_items`` (request, KV head) programs is too small for
    the one-warp tile over an fp8 cache (and, at head dim 256, takes the long-step tile)."""
    return work_items < FEW_PROGRAMS_PER_SM * sms


def attention_config(
    dtype: torch.dtype,
    head_dim: int,
    group: int,
    max_seqlen_q: int,
    few_programs: bool = False,
    fp8_kv: bool = False,
) -> AttentionConfig:
    """Tile rules. Rows hold (token, head-of-group) pairs, at least 16 (the MMA minimum).
    Decode keeps one token per tile, double-buffered, 64 keys a step on 2 warps: small
    programs, many resident an SM. Over an ``fp8_kv`` cache, whose widening to 16 bits is
    latency the SM must hide, 32 keys a step on 1 warp unless the (request, KV head)
    programs are ``few_programs`` (:func:`decode_has_few_programs`). Tiles the sweep did not
    measure this way keep 4 warps, 64 keys a step (128 when few), halved at head dim 256:
    head dim 256, and groups of more than 16 query heads a KV head, whose taller tile would
    not fit 1-2 warps' registers. Prefill grows the tile to 128 rows (64 for head dim 256) so
    each gathered K/V tile feeds more MMA work, 32 keys a step with 4 warps and 4 stages;
    over an ``fp8_kv`` cache (one byte a value) 64 keys a step, the bytes of a 16-bit tile.
    fp32 (exact tests) takes small tiles: its dots run on FMA units and its tiles use twice
    the shared memory."""
    block_d = next_power_of_2(head_dim)
    min_m = max(16, next_power_of_2(group))
    if dtype == torch.float32:
        block_m, block_n, warps, stages = min_m, (32 if block_d <= 128 else 16), 4, 1
    elif max_seqlen_q == 1:
        if block_d > 128 or min_m > 16:  # taller or wider tiles: 4 warps, as measured before
            block_n, warps = (128 if few_programs else 64) // (2 if block_d > 128 else 1), 4
        else:
            block_n, warps = (32, 1) if fp8_kv and not few_programs else (64, 2)
        block_m, stages = min_m, 2
    else:
        cap = 128 if block_d <= 128 else 64
        block_m = min(max(min_m, next_power_of_2(max_seqlen_q * group)), max(cap, min_m))
        block_n = 64 if fp8_kv and block_d <= 128 else 32
        warps = 8 if block_m > 128 else 4
        stages = 4 if block_d <= 128 else 2
    return AttentionConfig(block_m, max(1, block_m // group), block_n, warps, stages)


def choose_num_splits(work_items: int, max_seqlen_k: int, sms: int, block_n: int) -> int:
    """Split each context only to fill one wave: about 3 programs per SM fit (registers), so
    aim for ``3 * sms`` programs, keeping >= 2 tiles of keys (and >= 128 keys) per split. A
    second wave of short programs costs more than it adds. ``max_seqlen_k`` only steers this
    choice: each program derives its partition from the request's own length, so any length
    stays covered (also when a CUDA graph replays a launch captured at shorter contexts)."""
    min_part = max(128, 2 * block_n)
    return max(1, min((3 * sms) // max(1, work_items), max_seqlen_k // min_part, 64))
